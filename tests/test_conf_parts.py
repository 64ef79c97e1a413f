"""ConfParts: the agent's swanctl.conf part by part, equal to the whole file, rebuilt only
where the keyring changed."""

from __future__ import annotations

from pathlib import Path

import pytest
from keyring_fixtures import build_keyring

from overlay_vici.agent import render
from overlay_vici.agent.conf_parts import ConfParts
from overlay_vici.agent.plan import Desired
from overlay_vici.agent.render import Settings, swanctl_conf
from overlay_vici.agent.swanctl_conf import SwanctlSyntaxError, to_messages


@pytest.mark.parametrize("enforce", [True, False])
@pytest.mark.parametrize(("peers", "node"), [(1, "node-0"), (2, "node-1"), (7, "node-3")])
def test_the_parts_are_the_whole_file(peers: int, node: str, enforce: bool) -> None:
    """Same text as `render swanctl`, same messages as parsing it whole, same digests."""
    keyring = build_keyring(peers, generations=(1, 2))
    conf = ConfParts(Settings()).build(keyring, node, enforce)
    text = swanctl_conf(keyring, node, Settings(), enforce=enforce)
    assert conf.text == text
    assert conf.messages == to_messages(text)
    assert conf.digests == Desired.of(to_messages(text)).digests


def test_a_one_peer_change_renders_one_part(monkeypatch: pytest.MonkeyPatch) -> None:
    rendered: list[str] = []
    real = render.Part.render
    monkeypatch.setattr(
        render.Part, "render", lambda part, t, c: rendered.append(part.key) or real(part, t, c)
    )
    parts = ConfParts(Settings())
    parts.build(build_keyring(50), "node-0", True)
    assert len(rendered) == 49
    rendered.clear()
    conf = parts.build(build_keyring(51), "node-0", True)  # node-50 joins
    assert len(rendered) == 1 and len(conf.messages.conns) == 50
    rendered.clear()
    parts.build(build_keyring(51, generations=(2, 3)), "node-0", True)  # new keys for all
    assert len(rendered) == 50


def test_only_the_current_keyrings_parts_are_kept() -> None:
    """A retired generation's keys do not outlive the next build in the agent's memory."""
    parts = ConfParts(Settings())
    parts.build(build_keyring(5, generations=(1, 2)), "node-0", True)
    conf = parts.build(build_keyring(5, generations=(2, 3)), "node-0", True)
    assert len(parts._built) == 4
    assert not any(key_id.endswith("-g1") for key_id in conf.messages.shared)


def test_a_template_whose_parts_disagree_is_refused_in_one_sentence(tmp_path: Path) -> None:
    (tmp_path / "swanctl.conf.j2").write_text(
        "connections {\n  bypass {\n    remote_addrs = {{ peers[0].ip }}\n  }\n}\n"
    )
    with pytest.raises(SwanctlSyntaxError, match=r"^the swanctl.conf template renders bypass "):
        ConfParts(Settings(), tmp_path).build(build_keyring(3), "node-0", True)
