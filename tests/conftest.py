"""Fixtures shared by the host-side tests."""

from __future__ import annotations

import pytest
from keyring_fixtures import MakeKeyring, build_keyring


@pytest.fixture
def make_keyring() -> MakeKeyring:
    """build_keyring as a fixture: nodes node-<i> at distinct addresses, fixed keys."""
    return build_keyring
