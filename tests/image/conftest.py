"""The image tests run only against a built image: scripts/image builds it and names it in
OVERLAY_VICI_IMAGE."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "image: runs the built image (scripts/image)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="no image: scripts/image builds it and runs these tests")
    for item in items:
        if item.get_closest_marker("image") and not os.environ.get("OVERLAY_VICI_IMAGE"):
            item.add_marker(skip)
