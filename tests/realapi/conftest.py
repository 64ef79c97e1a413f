"""Fixtures of the real-API tests (see control_plane.py): one control plane per session,
deploy/ applied once, and a clean namespace for each test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from control_plane import MANIFEST, NS, TEST_NODE_LABEL, ControlPlane, binaries, running


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test in this folder is a real-API test (`-m realapi` selects them)."""
    here = Path(__file__).parent
    for item in items:
        if item.path.is_relative_to(here):
            item.add_marker(pytest.mark.realapi)


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    folder = binaries()
    with running(folder, tmp_path_factory.mktemp("kube")) as plane:
        yield plane


@pytest.fixture(scope="session")
def deployed(control_plane: ControlPlane) -> str:
    """deploy/overlay-vici.yaml applied server-side, as a user's first contact; its output."""
    return control_plane.kubectl(
        "apply", "--server-side", "--field-manager=overlay-vici-test", "-f", str(MANIFEST)
    ).stdout


@pytest.fixture
def cluster(control_plane: ControlPlane, deployed: str) -> Iterator[ControlPlane]:
    """The deployed control plane, without the Secret, the Leases or the test Nodes before and
    after each test (nothing garbage-collects them here)."""
    _clean(control_plane)
    yield control_plane
    _clean(control_plane)


def _clean(plane: ControlPlane) -> None:
    plane.kubectl("-n", NS, "delete", "secret", "overlay-vici-keys", "--ignore-not-found")
    plane.kubectl("-n", NS, "delete", "leases", "--all")
    plane.kubectl("-n", NS, "delete", "events", "--all")
    plane.kubectl("delete", "nodes", "-l", TEST_NODE_LABEL, "--ignore-not-found")
