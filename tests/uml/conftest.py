"""Fixtures for the tests that run inside the UML guest (see scripts/uml-guest).

The guest's init sets OVERLAY_VICI_UML=1; anywhere else these tests skip, because they
rewire the running kernel's network.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from mesh import Mesh

IN_GUEST = os.environ.get("OVERLAY_VICI_UML") == "1"


@pytest.fixture(autouse=True)
def _uml_guest_only() -> None:
    if not IN_GUEST:
        pytest.skip(
            "needs the UML guest: scripts/uml-guest -- .venv/bin/python -m pytest tests/uml"
        )


@pytest.fixture
def mesh3(tmp_path: Path) -> Iterator[Mesh]:
    with Mesh(3, tmp_path) as mesh:
        yield mesh


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item,
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On failure, show the end of the test's charon logs: the guest is gone when one reads them."""
    report = yield
    if report.when == "call" and report.failed:
        values = getattr(item, "funcargs", {}).values()
        # A Mesh, or a fixture that holds one (test_faults.Bed)
        meshes = [v for v in (getattr(v, "mesh", v) for v in values) if isinstance(v, Mesh)]
        for mesh in meshes:
            for node in mesh.nodes:
                if node.charon_log.exists():
                    report.sections.append((f"charon log of {node.name}", node.charon_log_tail()))
    return report
