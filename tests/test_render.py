"""Rendering from the keyring: what charon is told, and the operator's template override."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from keyring_fixtures import MakeKeyring, build_keyring, node_ip

from overlay_vici.agent.render import (
    Settings,
    SettingsError,
    conn_name,
    is_owned_conn,
    is_owned_secret,
    keyed_peers,
    secret_id,
    strongswan_conf,
    swanctl_conf,
)
from overlay_vici.agent.swanctl_conf import parse_settings, to_messages
from overlay_vici.core import keyring as kr
from overlay_vici.core.keyring import Peer, pair_psk, psk_for


def rendered(peers: int = 4, node: str = "node-1", **settings: str) -> dict[str, Any]:
    keyring = build_keyring(peers, generations=(1, 2), sent=2)
    return parse_settings(swanctl_conf(keyring, node, Settings(**settings)))


def test_one_connection_per_peer_excluding_self() -> None:
    """Every other node gets exactly one `ov-<name>` connection; the node itself none."""
    conns = rendered(5, node="node-2")["connections"]
    assert list(conns) == [conn_name(f"node-{i}") for i in (0, 1, 3, 4)]
    assert all(is_owned_conn(name) for name in conns)


def test_connection_is_pinned_ikev2_psk_without_mobike_or_encap() -> None:
    """Addresses and identities are the two node IPs; no MOBIKE, no UDP encapsulation."""
    conn = rendered(3, node="node-1")["connections"]["ov-node-2"]
    assert conn["version"] == "2"
    assert conn["local_addrs"] == node_ip(1) and conn["remote_addrs"] == node_ip(2)
    assert conn["local"] == {"auth": "psk", "id": node_ip(1)}
    assert conn["remote"] == {"auth": "psk", "id": node_ip(2)}
    assert conn["mobike"] == "no" and conn["encap"] == "no"


def test_single_child_protects_ipencap_in_transport_mode_on_trap() -> None:
    """One CHILD_SA `ipip`: transport mode, IP protocol 4 selectors, trap policies."""
    conn = rendered()["connections"]["ov-node-0"]
    assert list(conn["children"]) == ["ipip"]
    child = conn["children"]["ipip"]
    assert child["mode"] == "transport"
    assert child["local_ts"] == child["remote_ts"] == "dynamic[ipencap]"
    assert child["start_action"] == "trap"
    # Re-routing on DPD or close would re-install the trap over the live SA's policy and
    # drop a packet at every reauthentication; the start_action trap stays installed anyway.
    assert child["dpd_action"] == "clear" and "close_action" not in child


def test_the_reauthentication_responder_prefers_older_generations_sas() -> None:
    """The higher-IP end answers the reauthentication: its CHILD_SA policy priority worsens
    with the newest generation, so it keeps sending on the old SA until that is deleted. The
    lower-IP end, which initiates, keeps one priority (its new SA wins at once)."""

    def priorities(generations: tuple[int, ...]) -> dict[str, dict[str, int]]:
        keyring = build_keyring(3, generations=generations)
        return {
            node: {
                name: int(conn["children"]["ipip"]["priority"])
                for name, conn in parse_settings(swanctl_conf(keyring, node, Settings()))[
                    "connections"
                ].items()
            }
            for node in ("node-0", "node-1", "node-2")
        }

    before, staged, retired = priorities((1,)), priorities((1, 2)), priorities((2,))
    assert before["node-0"] == staged["node-0"] == {"ov-node-1": 1000, "ov-node-2": 1000}
    assert before["node-1"] == {"ov-node-0": 1001, "ov-node-2": 1000}
    assert staged["node-1"] == retired["node-1"] == {"ov-node-0": 1002, "ov-node-2": 1000}
    assert staged["node-2"] == {"ov-node-0": 1002, "ov-node-1": 1002}


def test_the_ike_config_changes_with_the_sent_generation_so_initiate_makes_a_new_sa() -> None:
    """charon reuses an IKE_SA only of an equal config: the stale ones of the last sent
    generation differ by rand_time (a tenth of the longer rekey/reauth time, plus parity)."""

    def rand_time(sent: int, **settings: str) -> str:
        keyring = build_keyring(3, generations=(1, 2), sent=sent)
        conf = parse_settings(swanctl_conf(keyring, "node-0", Settings(**settings)))
        return conf["connections"]["ov-node-1"]["rand_time"]

    assert (rand_time(1), rand_time(2)) == ("1441s", "1440s")  # 4h rekey
    assert rand_time(2, ike_rekey_time="0", reauth_time="1d") == "8640s"
    assert rand_time(1, ike_rekey_time="0") == "1s"  # no rekeying: rand_time unused


def test_default_settings_are_the_security_baseline() -> None:
    """Defaults: AES-GCM-128 with X25519 for IKE and ESP, rekeying, no periodic reauth."""
    conn = rendered()["connections"]["ov-node-0"]
    assert conn["proposals"] == "aes128gcm16-prfsha256-x25519"
    assert conn["children"]["ipip"]["esp_proposals"] == "aes128gcm16-x25519"
    assert (conn["rekey_time"], conn["reauth_time"], conn["dpd_delay"]) == ("4h", "0", "30s")
    assert conn["children"]["ipip"]["rekey_time"] == "1h"


def test_settings_reach_every_connection() -> None:
    """Operator settings land in each connection, as list values once parsed for VICI."""
    custom = {
        "ike_proposals": "aes256gcm16-prfsha384-ecp384",
        "esp_proposals": "aes256gcm16-ecp384",
        "ike_rekey_time": "2h",
        "child_rekey_time": "20m",
        "reauth_time": "1d",
        "dpd_delay": "10",
    }
    text = swanctl_conf(build_keyring(3), "node-0", Settings(**custom))
    for message in to_messages(text).conns.values():
        (conn,) = message.values()
        assert conn["proposals"] == [custom["ike_proposals"]]
        assert conn["children"]["ipip"]["esp_proposals"] == [custom["esp_proposals"]]
        assert conn["rekey_time"] == "2h" and conn["reauth_time"] == "1d"
        assert conn["dpd_delay"] == "10" and conn["children"]["ipip"]["rekey_time"] == "20m"


def test_secrets_per_peer_and_generation_with_owners_by_role(make_keyring: MakeKeyring) -> None:
    """The sent generation's key is owned by [peer IP]; accepted ones by [peer IP/32]: never
    by the node's own address, which would let charon verify any peer with it."""
    keyring = make_keyring(4, generations=(1, 2, 3), sent=2)
    node = keyring.peer("node-1")
    assert node is not None
    shared = to_messages(swanctl_conf(keyring, "node-1", Settings())).shared
    assert len(shared) == 3 * 3
    for peer in keyring.peers:
        if peer == node:
            continue
        for gen in keyring.generations:
            message = shared[secret_id(peer.name, gen.id)]
            assert is_owned_secret(message["id"]) and message["type"] == "ike"
            expected = [peer.ip] if gen.id == keyring.sent else [f"{peer.ip}/32"]
            assert message["owners"] == expected
            assert message["data"] == pair_psk(gen, node.ip, peer.ip)


def test_both_ends_render_the_same_pair_key(make_keyring: MakeKeyring) -> None:
    """node-0's key for node-3 equals node-3's key for node-0, for every generation."""
    keyring = make_keyring(4)
    a = to_messages(swanctl_conf(keyring, "node-0", Settings())).shared
    b = to_messages(swanctl_conf(keyring, "node-3", Settings())).shared
    for gen in keyring.generations:
        assert a[secret_id("node-3", gen.id)]["data"] == b[secret_id("node-0", gen.id)]["data"]


def test_lone_node_renders_empty_but_valid_sections(make_keyring: MakeKeyring) -> None:
    """A keyring holding only this node gives no connections and no secrets, still parseable."""
    messages = to_messages(swanctl_conf(make_keyring(1), "node-0", Settings()))
    assert messages.conns == {} and messages.shared == {}


def test_rendering_is_deterministic(make_keyring: MakeKeyring) -> None:
    """The same keyring and settings give byte-identical output (digests stay stable)."""
    keyring = make_keyring(6)
    assert swanctl_conf(keyring, "node-2", Settings()) == swanctl_conf(
        keyring, "node-2", Settings()
    )


def test_unknown_node_raises_lookup_error_naming_it(make_keyring: MakeKeyring) -> None:
    """A node missing from the keyring is one sentence saying which and what to check."""
    with pytest.raises(LookupError, match=r"^node node-9 is not in the keyring's peer list; "):
        swanctl_conf(make_keyring(3), "node-9", Settings())


# --- settings validation -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ike_rekey_time", "5x"),
        ("ike_rekey_time", ""),
        ("child_rekey_time", "1.5h"),
        ("reauth_time", "-1s"),
        ("dpd_delay", "30 s"),
        ("dpd_delay", "s"),
        ("ike_proposals", "AES128GCM16-prfsha256-x25519"),
        ("ike_proposals", "aes128gcm16,aes256gcm16"),
        ("esp_proposals", "aes128gcm16 x25519"),
        ("esp_proposals", "-aes128gcm16"),
        ("esp_proposals", "aes128gcm16--x25519"),
        ("esp_proposals", "aes128gcm16\n}\nconnections { evil { } }"),
    ],
)
def test_malformed_setting_raises_settings_error_naming_it(field: str, value: str) -> None:
    """A bad setting is refused with one sentence naming the field, the value and the form."""
    with pytest.raises(SettingsError) as info:
        Settings(**{field: value})
    message = str(info.value)
    assert message.startswith(f"{field} {value!r} is not a ")
    assert "\n" not in message.replace(repr(value), "")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ike_rekey_time", "0"),
        ("child_rekey_time", "3600"),
        ("reauth_time", "2d"),
        ("dpd_delay", "45m"),
        ("ike_proposals", "aes256gcm16-prfsha384-ecp384"),
        ("esp_proposals", "chacha20poly1305-curve25519"),
        ("esp_proposals", "aes128gcm16"),
    ],
)
def test_wellformed_settings_are_accepted(field: str, value: str) -> None:
    """Plain seconds, s/m/h/d suffixes and dash-joined lowercase proposals are accepted."""
    assert getattr(Settings(**{field: value}), field) == value


# --- templates -----------------------------------------------------------------------------


def test_override_dir_replaces_only_the_templates_it_holds(tmp_path: Path) -> None:
    """An override swanctl.conf.j2 wins; strongswan.conf.j2 still comes from the package."""
    (tmp_path / "swanctl.conf.j2").write_text(
        "# custom for {{ node.name }}\nconnections {\n"
        "{%- for peer in peers %}\n  {{ peer.conn }} { remote_addrs = {{ peer.ip }} }\n"
        "{%- endfor %}\n}\n"
    )
    keyring = build_keyring(3)
    text = swanctl_conf(keyring, "node-0", Settings(), templates=tmp_path)
    assert text.startswith("# custom for node-0\n")
    assert parse_settings(text)["connections"] == {
        "ov-node-1": {"remote_addrs": node_ip(1)},
        "ov-node-2": {"remote_addrs": node_ip(2)},
    }
    assert strongswan_conf("/run/x.vici", templates=tmp_path) == strongswan_conf("/run/x.vici")


def test_override_of_strongswan_conf_leaves_swanctl_builtin(tmp_path: Path) -> None:
    """Overriding only strongswan.conf.j2 keeps the built-in swanctl.conf.j2."""
    (tmp_path / "strongswan.conf.j2").write_text("charon { custom = {{ vici_socket }} }\n")
    keyring = build_keyring(3)
    assert strongswan_conf("/s", templates=tmp_path) == "charon { custom = /s }\n"
    assert swanctl_conf(keyring, "node-0", Settings(), tmp_path) == swanctl_conf(
        keyring, "node-0", Settings()
    )


def test_strongswan_conf_enables_make_before_break_and_the_vici_socket() -> None:
    """charon reauthenticates make-before-break, loads an explicit plugin list, serves VICI;
    it reuses IKE_SAs (an initiation racing a trap's acquire shares one)."""
    charon = parse_settings(strongswan_conf("/run/overlay/charon.vici"))["charon"]
    assert charon["make_before_break"] == "yes" and "reuse_ikesa" not in charon
    assert charon["load_modular"] == "no"
    assert charon["plugins"]["vici"]["socket"] == "unix:///run/overlay/charon.vici"
    plugins = charon["load"].split()
    assert {"vici", "kernel-netlink", "socket-default", "openssl", "gcm"} <= set(plugins)
    assert "filelog" not in charon


def test_strongswan_conf_log_file_is_optional() -> None:
    """--log-file adds a filelog section for that path, otherwise charon logs nowhere extra."""
    charon = parse_settings(strongswan_conf("/s.vici", log_file="/var/log/charon.log"))["charon"]
    (logger,) = charon["filelog"].values()
    assert logger["path"] == "/var/log/charon.log"
    assert logger["default"] == "1"


def test_a_keyring_change_derives_only_the_new_pairs_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """The PSK cache: one added peer costs its own HKDFs only, a new generation its own, and
    the keys rendered are exactly the derived ones (a stale cache entry would break IKE)."""
    from overlay_vici.agent import render

    derived: list[tuple[int, str]] = []

    def counting(gen: Any, node: Peer, peer: Peer, own: Any) -> bytes | None:
        derived.append((gen.id, peer.ip))
        return psk_for(gen, node, peer, own)

    monkeypatch.setattr(render, "psk_for", counting)
    render._psk_cache.clear()
    swanctl_conf(build_keyring(5, generations=(1, 2)), "node-0", Settings())
    assert len(derived) == 8  # 4 peers x 2 generations
    derived.clear()
    swanctl_conf(build_keyring(6, generations=(1, 2)), "node-0", Settings())
    assert derived == [(1, node_ip(5)), (2, node_ip(5))]
    derived.clear()
    keyring = build_keyring(6, generations=(2, 3), sent=3)
    text = swanctl_conf(keyring, "node-0", Settings())
    assert sorted(derived) == [(3, node_ip(i)) for i in range(1, 6)]
    assert {key[0].id for key in render._psk_cache} == {2, 3}  # generation 1 is gone
    node = keyring.peers[0]
    for peer in keyring.peers[1:]:
        for gen in keyring.generations:
            message = to_messages(text).shared[secret_id(peer.name, gen.id)]
            assert message["data"] == pair_psk(gen, node.ip, peer.ip)


def test_node_keys_give_connections_only_to_peers_with_a_public_key() -> None:
    """A generation with node keys: the node's PSKs with each peer are its own X25519
    exchange's; a peer without a public key gets no connection (its IPIP stays with the
    guard), and a node whose own key the keyring does not list yet has no PSK at all."""
    keys = [kr.new_node_key() for _ in range(4)]
    peers = [Peer(f"node-{i}", node_ip(i), kr.public_bytes(k)) for i, k in enumerate(keys)]
    peers[3] = dataclasses.replace(peers[3], pub=None)
    keyring = kr.create(peers, node_keys=True)
    gen = keyring.generation(keyring.sent)
    messages = to_messages(swanctl_conf(keyring, "node-0", Settings(), own=keys[0]))
    assert sorted(messages.conns) == ["ov-node-1", "ov-node-2"]
    for peer, key in zip(peers[1:3], keys[1:3], strict=True):
        shared = messages.shared[secret_id(peer.name, gen.id)]
        assert shared["data"] == kr.bound_pair_psk(gen, key, peer, peers[0])
    assert keyed_peers(keyring, peers[0], keys[0])[1] == [peers[3]]
    # A new own key, not yet published: no PSK with anyone, the connections (and their SAs)
    # stay until the master publishes it.
    stale = to_messages(swanctl_conf(keyring, "node-0", Settings(), own=kr.new_node_key()))
    assert sorted(stale.conns) == ["ov-node-1", "ov-node-2"] and not stale.shared
    assert keyed_peers(keyring, peers[0], kr.new_node_key())[1] == peers[1:]
