"""The node key file: made once with safe modes, kept, and a broken one refused clearly."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from overlay_vici.agent import node_key
from overlay_vici.core import keyring as kr


def test_made_once_0600_in_a_0700_directory_then_kept(tmp_path: Path) -> None:
    path = tmp_path / "state" / "node.key"
    made, fresh = node_key.load_or_create(path)
    assert fresh
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again, fresh = node_key.load_or_create(path)
    assert not fresh and kr.public_bytes(again) == kr.public_bytes(made)
    assert node_key.read(tmp_path / "absent") is None


@pytest.mark.parametrize("content", ["", "garbage\n", "QUJD\n"])
def test_a_broken_key_file_is_refused_in_one_sentence_and_left_alone(
    tmp_path: Path, content: str
) -> None:
    path = tmp_path / "node.key"
    path.write_text(content)
    with pytest.raises(node_key.NodeKeyError) as error:
        node_key.load_or_create(path)
    message = str(error.value)
    assert str(path) in message and "delete it" in message and "\n" not in message
    assert path.read_text() == content  # not replaced behind the operator's back


def test_an_unwritable_place_is_one_sentence_naming_the_fix() -> None:
    """As a read-only root filesystem would (and unwritable even for root: /proc)."""
    with pytest.raises(node_key.NodeKeyError) as error:
        node_key.load_or_create(Path("/proc/overlay-vici-test/node.key"))
    message = str(error.value)
    assert "cannot write the node key" in message and "--node-key" in message
    assert "\n" not in message
