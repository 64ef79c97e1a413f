"""guard_plan: the fail-closed guard's rules, decided without iptables."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from overlay_vici.agent.guard_plan import (
    IN,
    OUT,
    GuardPeer,
    choose_backend,
    install_script,
    installed_outside,
    outside_peers,
    removal_script,
)

OUTSIDE = [("n5", "10.99.0.5"), ("n6", "10.99.0.6")]


def saved_as_iptables_prints(outside: list[tuple[str, str]], jumps: int = 1) -> dict[str, str]:
    """What iptables-save (1.8.9, legacy and nft alike) prints for an installed guard."""
    raw = [
        "*raw",
        ":PREROUTING ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":OVERLAY-VICI-GUARD-OUT - [0:0]",
        "-A PREROUTING -p ipencap -m policy --dir in --pol none -m comment --comment ovv-x",
        *["-A OUTPUT -p ipencap -j OVERLAY-VICI-GUARD-OUT"] * jumps,
        "-A OVERLAY-VICI-GUARD-OUT -m policy --dir out --pol ipsec -j RETURN",
        *[
            f"-A OVERLAY-VICI-GUARD-OUT -d {ip}/32 "
            f'-m comment --comment "overlay-vici guard: outside the mesh: {name}" -j RETURN'
            for name, ip in outside
        ],
        "-A OVERLAY-VICI-GUARD-OUT -p ipencap -m policy --dir out --pol none -m comment "
        '--comment "overlay-vici guard: IPIP that IPsec does not protect" -j DROP',
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
            f"-A OVERLAY-VICI-GUARD-IN -s {ip}/32 "
            f'-m comment --comment "overlay-vici guard: outside the mesh: {name}" -j RETURN'
            for name, ip in outside
        ],
        "-A OVERLAY-VICI-GUARD-IN -p ipencap -m policy --dir in --pol none -m comment "
        '--comment "overlay-vici guard: IPIP that IPsec does not protect" -j DROP',
        "COMMIT",
    ]
    return {"raw": "\n".join(raw) + "\n", "mangle": "\n".join(mangle) + "\n"}


def test_outside_nodes_skip_ipv6_and_are_sorted_by_address() -> None:
    outside = outside_peers([("n9", "10.99.0.10"), *OUTSIDE, ("v6", "fd00::1")])
    assert [p.name for p in outside] == ["n5", "n6", "n9"]


def test_first_install_script_declares_both_chains_fills_them_and_adds_the_jumps() -> None:
    script = install_script(outside_peers(OUTSIDE[:1]), {})
    assert script == (
        "*raw\n"
        ":OVERLAY-VICI-GUARD-OUT - [0:0]\n"
        "-A OVERLAY-VICI-GUARD-OUT -m policy --dir out --pol ipsec -j RETURN\n"
        "-A OVERLAY-VICI-GUARD-OUT -d 10.99.0.5/32 "
        '-m comment --comment "overlay-vici guard: outside the mesh: n5" -j RETURN\n'
        "-A OVERLAY-VICI-GUARD-OUT -p 4 -m policy --dir out --pol none "
        '-m comment --comment "overlay-vici guard: IPIP that IPsec does not protect" -j DROP\n'
        "-I OUTPUT 1 -p 4 -j OVERLAY-VICI-GUARD-OUT\n"
        "COMMIT\n"
        "*mangle\n"
        ":OVERLAY-VICI-GUARD-IN - [0:0]\n"
        "-A OVERLAY-VICI-GUARD-IN -m policy --dir in --pol ipsec -j RETURN\n"
        "-A OVERLAY-VICI-GUARD-IN -s 10.99.0.5/32 "
        '-m comment --comment "overlay-vici guard: outside the mesh: n5" -j RETURN\n'
        "-A OVERLAY-VICI-GUARD-IN -p 4 -m policy --dir in --pol none "
        '-m comment --comment "overlay-vici guard: IPIP that IPsec does not protect" -j DROP\n'
        "-I INPUT 1 -p 4 -j OVERLAY-VICI-GUARD-IN\n"
        "COMMIT\n"
    )


def test_an_existing_jump_is_not_added_again() -> None:
    script = install_script(outside_peers(OUTSIDE), saved_as_iptables_prints(OUTSIDE[1:]))
    assert "-I OUTPUT" not in script and "-I INPUT" not in script
    assert script.count(":OVERLAY-VICI-GUARD-") == 2  # still replaced whole


def test_nobody_outside_the_mesh_drops_every_unprotected_ipip() -> None:
    """The usual case: no allow rule, so no address at all escapes the DROP."""
    script = install_script((), {})
    assert script.count("-j RETURN") == 2  # the IPsec RETURN, each way
    assert script.count("-j DROP") == 2 and " -d " not in script and " -s " not in script
    assert "-I OUTPUT 1 -p 4 -j OVERLAY-VICI-GUARD-OUT" in script


def test_each_allow_rule_comes_before_the_drop() -> None:
    for table in install_script(outside_peers(OUTSIDE), {}).split("COMMIT\n")[:2]:
        rules = [line for line in table.splitlines() if line.startswith("-A ")]
        assert "--pol ipsec -j RETURN" in rules[0]
        assert all("outside the mesh" in rule for rule in rules[1:-1]) and len(rules) == 4
        assert rules[-1].endswith("-j DROP") and "--pol none" in rules[-1]


def test_a_253_character_node_name_fits_the_255_character_comment() -> None:
    """xt_comment refuses longer comments, and the restore with them; the address decides."""
    longest = ".".join(["a" * 63] * 3 + ["b" * 61])
    script = install_script(outside_peers([(longest, "10.99.0.9")]), {})
    comments = [line.split('--comment "')[1].split('"')[0] for line in script.splitlines()
                if "outside the mesh" in line]  # fmt: skip
    assert len(longest) == 253 and comments and all(len(c) <= 255 for c in comments)


def test_installed_outside_reads_back_what_iptables_save_prints() -> None:
    assert installed_outside(saved_as_iptables_prints(OUTSIDE)) == outside_peers(OUTSIDE)
    assert installed_outside(saved_as_iptables_prints([])) == ()


def test_protocol_printed_as_a_number_reads_back_too() -> None:
    """Without /etc/protocols (a slim image) iptables-save prints `-p 4`."""
    saved = {
        table: text.replace("-p ipencap", "-p 4")
        for table, text in saved_as_iptables_prints(OUTSIDE).items()
    }
    assert installed_outside(saved) == outside_peers(OUTSIDE)


FOREIGN = "-A OVERLAY-VICI-GUARD-OUT -p icmp -j ACCEPT\n"  # someone else's rule in our chain


def _swap_last_rules(text: str) -> str:
    lines = text.splitlines()
    lines[-3], lines[-2] = lines[-2], lines[-3]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: {"raw": s["raw"]},  # the mangle table was never written
        lambda s: {**s, "raw": s["raw"].replace("-A OUTPUT -p ipencap -j OVERLAY", "#")},
        lambda s: {**s, "mangle": s["mangle"].replace("--pol ipsec -j RETURN", "--pol ipsec")},
        lambda s: {**s, "mangle": s["mangle"].replace("-s 10.99.0.6/32", "-s 10.99.0.7/32")},
        lambda s: {**s, "raw": s["raw"].replace("-j DROP", "-j ACCEPT")},
        lambda s: {**s, "raw": "\n".join(s["raw"].splitlines()[:-2]) + "\nCOMMIT\n"},
        lambda s: {**s, "mangle": _swap_last_rules(s["mangle"])},
        lambda s: {**s, "raw": s["raw"].replace("-j RETURN\n", "-j RETURN\n" + FOREIGN, 1)},
    ],
    ids=[
        "table missing",
        "jump missing",
        "no ipsec return",
        "allow-lists differ",
        "not a drop",
        "no catch-all",
        "allow after the drop",
        "foreign rule",
    ],
)
def test_a_guard_that_is_not_whole_reads_back_as_none(damage) -> None:  # type: ignore[no-untyped-def]
    assert installed_outside(damage(saved_as_iptables_prints(OUTSIDE))) is None


def test_the_per_peer_guard_of_earlier_releases_is_not_whole() -> None:
    """An upgrade finds per-peer DROPs and no catch-all: the agent replaces them."""
    saved = saved_as_iptables_prints([])
    old = (
        "-A OVERLAY-VICI-GUARD-OUT -d 10.99.0.2/32 -p ipencap -m policy --dir out --pol none "
        '-m comment --comment "overlay-vici guard: n2" -j DROP'
    )
    last = saved["raw"].splitlines()[-2]
    assert installed_outside({**saved, "raw": saved["raw"].replace(last, old)}) is None


def test_removal_deletes_every_jump_and_both_chains() -> None:
    script = removal_script(saved_as_iptables_prints(OUTSIDE, jumps=2))
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


def test_outside_nodes_order_by_address_not_text() -> None:
    outside = outside_peers([("a", "10.0.0.10"), ("b", "10.0.0.9")])
    assert outside == (
        GuardPeer(IPv4Address("10.0.0.9"), "b"),
        GuardPeer(IPv4Address("10.0.0.10"), "a"),
    )
