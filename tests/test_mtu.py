"""The tunl0 MTU that keeps IPIP inside transport-mode ESP (AES-GCM-128) within the link MTU,
and the check of a node's tunl0 against it (pure, and on a stand-in /sys and route table;
tests/uml/test_metrics_mesh.py runs it on real interfaces)."""

from __future__ import annotations

from pathlib import Path

import pytest

from overlay_vici.agent import mtu
from overlay_vici.agent.mtu import (
    Link,
    MtuError,
    Route,
    check,
    ipip_mtu,
    network_links,
    parse_routes,
    read_links,
    verdict,
)
from overlay_vici.cli import main


def wire_size(inner: int) -> int:
    """Bytes on the wire for an inner packet: outer IPv4 20, ESP header 8, GCM IV 8,
    payload padded so payload + 2 trailer bytes is a multiple of 4, ICV 16."""
    padding = -(inner + 2) % 4
    return 20 + 8 + 8 + inner + padding + 2 + 16


@pytest.mark.parametrize(("external", "inner"), [(1500, 1446), (9000, 8946), (576, 522)])
def test_known_values(external: int, inner: int) -> None:
    """1500 gives 1446 (not 1452: that one is 1508 bytes on the wire)."""
    assert ipip_mtu(external) == inner
    assert wire_size(1452) == 1508


def test_largest_fitting_and_aligned_over_the_whole_range() -> None:
    """For every external MTU 576..9216: (size + 2) % 4 == 0, it fits, and nothing larger does."""
    for external in range(576, 9217):
        size = ipip_mtu(external)
        assert (size + 2) % 4 == 0
        assert wire_size(size) <= external
        assert all(wire_size(bigger) > external for bigger in range(size + 1, size + 9))


@pytest.mark.parametrize("external", [575, 68, 0, -1500])
def test_below_ipv4_minimum_raises(external: int) -> None:
    """Links below 576 bytes are refused with a message naming the value and the minimum."""
    with pytest.raises(ValueError, match=rf"^external MTU {external} is below the IPv4 minimum"):
        ipip_mtu(external)


# --- the check: `overlay-vici mtu --check` and the agent's warning at start ------------------


def test_verdict_too_large_names_the_value_to_set_in_one_sentence() -> None:
    result = verdict("tunl0", 1480, 1500, ["eth0"])
    assert not result.ok and result.safe == 1446
    assert result.message == (
        "tunl0's MTU 1480 is too large for IPsec over a 1500-byte network (eth0), so larger "
        "pod packets will be dropped: set it to 1446 with Calico's ipipMTU in the "
        "FelixConfiguration (or veth_mtu in the calico-config ConfigMap, or "
        "spec.calicoNetwork.mtu with the operator)"
    )
    assert result.message.count(". ") == 0 and "\n" not in result.message


@pytest.mark.parametrize(("tunnel_mtu", "ok"), [(1446, True), (1400, True), (1447, False)])
def test_verdict_boundary(tunnel_mtu: int, ok: bool) -> None:
    """Exactly ipip_mtu(external) fits; one byte more does not."""
    result = verdict("tunl0", tunnel_mtu, 1500)
    assert result.ok is ok
    if ok:
        assert result.message == (
            f"tunl0's MTU {tunnel_mtu} fits IPsec over a 1500-byte network, which allows up to 1446"
        )


PROC_ROUTE = """\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth0\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth1\t0000A8C0\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
tunl0\t0001F40A\t0200000A\t0007\t0\t0\t0\t00FFFFFF\t0\t0\t0
cali1234\t0500F40A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0
*\t0000F40A\t00000000\t0201\t0\t0\t0\t00FFFFFF\t0\t0\t0
docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
vxlan.calico\t0002F40A\t0200F40A\t0003\t0\t0\t0\tC0FFFFFF\t0\t0\t0
"""


def test_the_network_is_the_interfaces_carrying_default_and_network_routes() -> None:
    """Left out: a pod's /32 route over its veth, the blackhole (reject) route, tunnels
    (tunl0, vxlan) and a down interface."""
    routes = parse_routes(PROC_ROUTE)
    assert routes[0] == Route("eth0", 0, 0, 3)
    links = {
        "eth0": Link("eth0", 9001, up=True),
        "eth1": Link("eth1", 1500, up=True),
        "tunl0": Link("tunl0", 1480, up=True, tunnel=True),
        "cali1234": Link("cali1234", 1440, up=True),
        "docker0": Link("docker0", 1500, up=False),
        "vxlan.calico": Link("vxlan.calico", 1450, up=True, tunnel=True),
        "lo": Link("lo", 65536, up=True, loopback=True),
    }
    assert [link.name for link in network_links(links, routes)] == ["eth0", "eth1"]
    # The tunnel under test never counts, even if it does not look like one.
    plain = {**links, "tunl0": Link("tunl0", 1480, up=True)}
    assert [link.name for link in network_links(plain, routes)] == ["eth0", "eth1"]


def fake_sysfs(root: Path, links: dict[str, tuple[int, int, str, str, str]]) -> Path:
    """/sys/class/net: name -> (mtu, type, flags, operstate, DEVTYPE)."""
    for name, (size, kind, flags, operstate, devtype) in links.items():
        entry = root / name
        entry.mkdir(parents=True)
        (entry / "mtu").write_text(f"{size}\n")
        (entry / "type").write_text(f"{kind}\n")
        (entry / "flags").write_text(f"{flags}\n")
        (entry / "operstate").write_text(f"{operstate}\n")
        (entry / "uevent").write_text(
            f"INTERFACE={name}\n" + (f"DEVTYPE={devtype}\n" if devtype else "")
        )
    return root


NODE = {
    "lo": (65536, 772, "0x9", "unknown", ""),
    "eth0": (1500, 1, "0x1003", "up", ""),
    "eth1": (1500, 1, "0x1002", "down", ""),  # not up
    "tunl0": (1480, 768, "0x81", "unknown", ""),
    "vxlan.calico": (1450, 1, "0x1043", "unknown", "vxlan"),
    "wg0": (1420, 65534, "0x91", "unknown", "wireguard"),
}


def test_read_links_from_sysfs(tmp_path: Path) -> None:
    links = read_links(fake_sysfs(tmp_path / "net", NODE))
    assert links["eth0"] == Link("eth0", 1500, up=True)
    assert links["eth1"].up is False
    assert links["lo"].loopback and links["tunl0"].tunnel
    assert links["vxlan.calico"].tunnel and links["wg0"].tunnel


def test_check_on_a_node_with_tunl0_too_large_then_fixed(tmp_path: Path) -> None:
    routes = tmp_path / "route"
    routes.write_text(PROC_ROUTE.replace("eth1", "eth9"))  # eth0's routes, and others
    net = fake_sysfs(tmp_path / "net", NODE)
    result = check("tunl0", sys_net=net, proc_route=routes)
    assert (result.ok, result.tunnel_mtu, result.external_mtu, result.safe) == (
        False, 1480, 1500, 1446
    )  # fmt: skip
    assert result.links == ("eth0",)
    (net / "tunl0" / "mtu").write_text("1446\n")
    assert check("tunl0", sys_net=net, proc_route=routes).ok
    # A stated network MTU wins over the interfaces'.
    assert not check("tunl0", 1400, sys_net=net, proc_route=routes).ok


def test_check_refuses_what_it_cannot_judge(tmp_path: Path) -> None:
    routes = tmp_path / "route"
    routes.write_text(PROC_ROUTE.splitlines()[0] + "\n")
    net = fake_sysfs(tmp_path / "net", NODE)
    with pytest.raises(MtuError, match=r"^there is no interface tunl9 here \(is Calico in IPIP"):
        check("tunl9", sys_net=net, proc_route=routes)
    with pytest.raises(MtuError, match=r"state the network MTU with --external-mtu$"):
        check("tunl0", sys_net=net, proc_route=routes)
    with pytest.raises(MtuError, match=r"^cannot read the routes in "):
        check("tunl0", sys_net=net, proc_route=tmp_path / "missing")


def test_mtu_check_cli_exit_codes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """0 with one line on stdout, 1 with the warning on stderr, 2 when it cannot judge."""
    routes = tmp_path / "route"
    routes.write_text(PROC_ROUTE)
    monkeypatch.setattr(mtu, "SYS_NET", fake_sysfs(tmp_path / "net", NODE))
    monkeypatch.setattr(mtu, "PROC_ROUTE", routes)

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = run("mtu", "--check")
    assert code == 1 and out == "" and err.count("\n") == 1 and "set it to 1446" in err
    code, out, err = run("mtu", "--check", "--external-mtu", "1600")
    assert (code, err) == (0, "")
    assert out == "tunl0's MTU 1480 fits IPsec over a 1600-byte network, which allows up to 1546\n"
    code, out, err = run("mtu", "--check", "--tunnel", "tunl7")
    assert (code, out) == (2, "")
    assert err == "overlay-vici: there is no interface tunl7 here (is Calico in IPIP mode?)\n"
    assert run("mtu", "--check", "1500")[0] == 2
    assert run("mtu")[::2] == (2, "overlay-vici: mtu needs the external MTU (EXTMTU), or --check\n")
