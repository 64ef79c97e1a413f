"""guard_plan: the fail-closed guard's rules, decided without iptables."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from overlay_vici.guard_plan import (
    IN,
    OUT,
    GuardPeer,
    choose_backend,
    guard_peers,
    install_script,
    installed_peers,
    removal_script,
)

PEERS = [("n1", "10.99.0.1"), ("n2", "10.99.0.2"), ("n3", "10.99.0.3")]


def saved_as_iptables_prints(peers: list[tuple[str, str]], jumps: int = 1) -> dict[str, str]:
    """What iptables-save (1.8.9, legacy or nft) prints for an installed guard."""
    raw = [
        "*raw",
        ":PREROUTING ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":OVERLAY-VICI-GUARD-OUT - [0:0]",
        "-A PREROUTING -p ipencap -m policy --dir in --pol none -m comment --comment ovv-x",
        *["-A OUTPUT -p ipencap -j OVERLAY-VICI-GUARD-OUT"] * jumps,
        "-A OVERLAY-VICI-GUARD-OUT -m policy --dir out --pol ipsec -j RETURN",
        *[
            f"-A OVERLAY-VICI-GUARD-OUT -d {ip}/32 -p ipencap -m policy --dir out --pol none "
            f'-m comment --comment "overlay-vici guard: {name}" -j DROP'
            for name, ip in peers
        ],
        "COMMIT",
    ]
    mangle = [
        "*mangle",
        ":PREROUTING ACCEPT [0:0]",
        ":INPUT ACCEPT [0:0]",
        ":OVERLAY-VICI-GUARD-IN - [0:0]",
        *["-A INPUT -p ipencap -j OVERLAY-VICI-GUARD-IN"] * jumps,
        "-A OVERLAY-VICI-GUARD-IN -m policy --dir in --pol ipsec -j RETURN",
        *[
            f"-A OVERLAY-VICI-GUARD-IN -s {ip}/32 -p ipencap -m policy --dir in --pol none "
            f'-m comment --comment "overlay-vici guard: {name}" -j DROP'
            for name, ip in peers
        ],
        "COMMIT",
    ]
    return {"raw": "\n".join(raw) + "\n", "mangle": "\n".join(mangle) + "\n"}


def test_peers_exclude_this_node_and_ipv6_and_are_sorted_by_address() -> None:
    peers = guard_peers([("n9", "10.99.0.10"), *PEERS, ("v6", "fd00::1")], "n2")
    assert [p.name for p in peers] == ["n1", "n3", "n9"]


def test_first_install_script_declares_both_chains_fills_them_and_adds_the_jumps() -> None:
    script = install_script(guard_peers(PEERS, "n1"), {})
    assert script == (
        "*raw\n"
        ":OVERLAY-VICI-GUARD-OUT - [0:0]\n"
        "-A OVERLAY-VICI-GUARD-OUT -m policy --dir out --pol ipsec -j RETURN\n"
        "-A OVERLAY-VICI-GUARD-OUT -d 10.99.0.2/32 -p 4 -m policy --dir out --pol none "
        '-m comment --comment "overlay-vici guard: n2" -j DROP\n'
        "-A OVERLAY-VICI-GUARD-OUT -d 10.99.0.3/32 -p 4 -m policy --dir out --pol none "
        '-m comment --comment "overlay-vici guard: n3" -j DROP\n'
        "-I OUTPUT 1 -p 4 -j OVERLAY-VICI-GUARD-OUT\n"
        "COMMIT\n"
        "*mangle\n"
        ":OVERLAY-VICI-GUARD-IN - [0:0]\n"
        "-A OVERLAY-VICI-GUARD-IN -m policy --dir in --pol ipsec -j RETURN\n"
        "-A OVERLAY-VICI-GUARD-IN -s 10.99.0.2/32 -p 4 -m policy --dir in --pol none "
        '-m comment --comment "overlay-vici guard: n2" -j DROP\n'
        "-A OVERLAY-VICI-GUARD-IN -s 10.99.0.3/32 -p 4 -m policy --dir in --pol none "
        '-m comment --comment "overlay-vici guard: n3" -j DROP\n'
        "-I INPUT 1 -p 4 -j OVERLAY-VICI-GUARD-IN\n"
        "COMMIT\n"
    )


def test_an_existing_jump_is_not_added_again() -> None:
    script = install_script(guard_peers(PEERS, "n1"), saved_as_iptables_prints(PEERS[1:]))
    assert "-I OUTPUT" not in script and "-I INPUT" not in script
    assert script.count(":OVERLAY-VICI-GUARD-") == 2  # still replaced whole


def test_no_peers_still_installs_the_chains() -> None:
    """A one-node mesh: the chains and jumps exist, ready for the first peer."""
    script = install_script((), {})
    assert "-j DROP" not in script and script.count("-j RETURN") == 2
    assert "-I OUTPUT 1 -p 4 -j OVERLAY-VICI-GUARD-OUT" in script


def test_installed_peers_reads_back_what_iptables_save_prints() -> None:
    saved = saved_as_iptables_prints(PEERS[1:])
    assert installed_peers(saved) == {IPv4Address("10.99.0.2"), IPv4Address("10.99.0.3")}
    assert installed_peers(saved_as_iptables_prints([])) == set()


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: {"raw": s["raw"]},  # the mangle table was never written
        lambda s: {**s, "raw": s["raw"].replace("-A OUTPUT -p ipencap -j OVERLAY", "#")},
        lambda s: {**s, "mangle": s["mangle"].replace("--pol ipsec -j RETURN", "--pol ipsec")},
        lambda s: {**s, "mangle": s["mangle"].replace("-s 10.99.0.3/32", "-s 10.99.0.4/32")},
        lambda s: {**s, "raw": s["raw"].replace("-j DROP", "-j ACCEPT", 1)},
    ],
    ids=["table missing", "jump missing", "no return", "peers differ", "not a drop"],
)
def test_a_guard_that_is_not_whole_reads_back_as_none(damage) -> None:  # type: ignore[no-untyped-def]
    assert installed_peers(damage(saved_as_iptables_prints(PEERS[1:]))) is None


def test_removal_deletes_every_jump_and_both_chains() -> None:
    script = removal_script(saved_as_iptables_prints(PEERS[1:], jumps=2))
    assert script == (
        "*raw\n"
        "-D OUTPUT -p ipencap -j OVERLAY-VICI-GUARD-OUT\n"
        "-D OUTPUT -p ipencap -j OVERLAY-VICI-GUARD-OUT\n"
        "-F OVERLAY-VICI-GUARD-OUT\n"
        "-X OVERLAY-VICI-GUARD-OUT\n"
        "COMMIT\n"
        "*mangle\n"
        "-D INPUT -p ipencap -j OVERLAY-VICI-GUARD-IN\n"
        "-D INPUT -p ipencap -j OVERLAY-VICI-GUARD-IN\n"
        "-F OVERLAY-VICI-GUARD-IN\n"
        "-X OVERLAY-VICI-GUARD-IN\n"
        "COMMIT\n"
    )


def test_removal_of_nothing_is_nothing() -> None:
    assert removal_script({"raw": "*raw\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n", "mangle": ""}) is None


def test_hooks_are_where_felix_accepts_no_ipip() -> None:
    """Felix ACCEPTs IPIP from and to its hosts in filter INPUT/OUTPUT, before our rules."""
    assert (OUT.table, OUT.builtin, OUT.direction) == ("raw", "OUTPUT", "out")
    assert (IN.table, IN.builtin, IN.direction) == ("mangle", "INPUT", "in")


LEGACY_RULES = "".join(f"-A KUBE-{i} -j RETURN\n" for i in range(12))


@pytest.mark.parametrize(
    ("setting", "legacy", "nft", "expected"),
    [
        ("NFT", LEGACY_RULES, "", "nft"),  # Calico's setting wins, in any case
        ("Legacy", "", LEGACY_RULES, "legacy"),
        ("Auto", "", "-A X -j RETURN\n", "nft"),
        (None, LEGACY_RULES, LEGACY_RULES * 3, "legacy"),  # 10 legacy rules settle it
        (None, "-A X -j RETURN\n", "-A X -j RETURN\n-A Y -j RETURN\n", "nft"),
        (None, "", "", "legacy"),  # nothing anywhere, as in the UML guest: legacy, like Felix
        (None, "# Warning: iptables-legacy tables present\n", "", "legacy"),
    ],
)
def test_backend_is_chosen_like_calico(
    setting: str | None, legacy: str, nft: str, expected: str
) -> None:
    assert choose_backend(setting, legacy, nft) == expected


def test_guard_peer_orders_by_address_not_text() -> None:
    peers = guard_peers([("a", "10.0.0.10"), ("b", "10.0.0.9")], "x")
    assert peers == (
        GuardPeer(IPv4Address("10.0.0.9"), "b"),
        GuardPeer(IPv4Address("10.0.0.10"), "a"),
    )
