"""Fixtures shared by the host-side tests."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from keyring_fixtures import MakeKeyring, build_keyring


@pytest.fixture
def make_keyring() -> MakeKeyring:
    """build_keyring as a fixture: nodes node-<i> at distinct addresses, fixed keys."""
    return build_keyring


@pytest.fixture(autouse=True)
def _fresh_log_handlers() -> Iterator[None]:
    """A CLI run in one test points the package's log handler at that test's captured
    stderr; the next test must not write to it once it is closed."""
    logger = logging.getLogger("overlay_vici")
    handlers = list(logger.handlers)
    yield
    logger.handlers[:] = handlers
