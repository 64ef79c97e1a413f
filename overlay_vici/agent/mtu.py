"""The largest pod MTU that fits IPIP inside transport-mode ESP with AES-GCM-128, and the
check that a node's tunl0 respects it.

Pure: `ipip_mtu`, `parse_routes`, `network_links` and `verdict`. The edge (`read_links`,
`check`, `log_check`) reads /sys/class/net/*/{mtu,type,flags,operstate,uevent} and
/proc/net/route of the calling process's network namespace.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

IPIP_HEADER = 20
# ESP header (SPI, sequence) 8 + GCM IV 8 + trailer (pad length, next header) 2 + ICV 16.
ESP_GCM_OVERHEAD = 8 + 8 + 2 + 16
ESP_ALIGN = 4

DEFAULT_TUNNEL = "tunl0"
SYS_NET = Path("/sys/class/net")
PROC_ROUTE = Path("/proc/net/route")
# ARPHRD_TUNNEL, _TUNNEL6, _SIT, _IPGRE, _IP6GRE and _NONE (WireGuard, tun): tunnels.
TUNNEL_TYPES = frozenset({768, 769, 776, 778, 823, 65534})
# Tunnels that look like Ethernet (ARPHRD_ETHER) say what they are in their uevent.
TUNNEL_DEVTYPES = frozenset({"vxlan", "geneve", "gretap", "ip6gretap", "bareudp", "wireguard"})
IFF_UP, IFF_LOOPBACK = 0x1, 0x8
RTF_UP, RTF_REJECT = 0x1, 0x200
HOST_MASK = 0xFFFFFFFF


class MtuError(ValueError):
    """The MTUs cannot be read or judged; one sentence."""


def ipip_mtu(external_mtu: int) -> int:
    """Largest inner packet whose IPIP+ESP encapsulation fits `external_mtu`.

    ESP pads payload + 2 trailer bytes to a multiple of 4, so the result is the largest
    size <= external - 54 with (size + 2) % 4 == 0: 1500 gives 1446.
    """
    if external_mtu < 576:
        raise ValueError(f"external MTU {external_mtu} is below the IPv4 minimum of 576")
    room = external_mtu - IPIP_HEADER - ESP_GCM_OVERHEAD + 2
    return room - room % ESP_ALIGN - 2


@dataclass(frozen=True)
class Link:
    """A network interface as /sys/class/net shows it."""

    name: str
    mtu: int
    up: bool
    loopback: bool = False
    tunnel: bool = False


@dataclass(frozen=True)
class Route:
    """An IPv4 route of the main table, as /proc/net/route lists it (host byte order)."""

    iface: str
    destination: int
    mask: int
    flags: int


@dataclass(frozen=True)
class Verdict:
    ok: bool
    tunnel: str
    tunnel_mtu: int
    external_mtu: int
    safe: int  # the largest tunnel MTU that fits
    links: tuple[str, ...]  # where external_mtu came from; empty if stated
    message: str  # one sentence


def parse_routes(text: str) -> list[Route]:
    """/proc/net/route: a header line, then Iface Destination Gateway Flags ... Mask ..."""
    routes = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            routes.append(
                Route(fields[0], int(fields[1], 16), int(fields[7], 16), int(fields[3], 16))
            )
        except ValueError:
            continue
    return routes


def network_links(
    links: Mapping[str, Link], routes: Iterable[Route], tunnel: str = DEFAULT_TUNNEL
) -> list[Link]:
    """The interfaces the node's own traffic leaves by: up, not loopback, not a tunnel, and
    carrying the default route or a route to a network (a node subnet, directly or via a
    gateway). Host routes (/32) are left out: Calico's routes to local pods are /32 routes
    over their veths, whose MTU is the pods', not the network's. `tunnel` itself never
    counts, whatever its type."""
    names = set()
    for route in routes:
        if not route.flags & RTF_UP or route.flags & RTF_REJECT:
            continue
        if route.mask == HOST_MASK:
            continue
        names.add(route.iface)
    chosen = [links[n] for n in sorted(names) if n in links]
    return [
        link
        for link in chosen
        if link.up and not link.loopback and not link.tunnel and link.name != tunnel
    ]


def verdict(tunnel: str, tunnel_mtu: int, external_mtu: int, links: Iterable[str] = ()) -> Verdict:
    """Does `tunnel`'s MTU keep IPIP+ESP within `external_mtu`? The message is one sentence."""
    safe = ipip_mtu(external_mtu)
    named = tuple(links)
    network = f"a {external_mtu}-byte network" + (f" ({', '.join(named)})" if named else "")
    if tunnel_mtu <= safe:
        message = (
            f"{tunnel}'s MTU {tunnel_mtu} fits IPsec over {network}, which allows up to {safe}"
        )
        return Verdict(True, tunnel, tunnel_mtu, external_mtu, safe, named, message)
    message = (
        f"{tunnel}'s MTU {tunnel_mtu} is too large for IPsec over {network}, so larger pod "
        f"packets will be dropped: set it to {safe} with Calico's ipipMTU in the "
        f"FelixConfiguration (or veth_mtu in the calico-config ConfigMap, or "
        f"spec.calicoNetwork.mtu with the operator)"
    )
    return Verdict(False, tunnel, tunnel_mtu, external_mtu, safe, named, message)


# -- the edge -------------------------------------------------------------------------------


def read_links(sys_net: Path | None = None) -> dict[str, Link]:
    sys_net = sys_net or SYS_NET
    links = {}
    for entry in sorted(sys_net.iterdir()) if sys_net.is_dir() else ():
        try:
            mtu = int((entry / "mtu").read_text())
            kind = int((entry / "type").read_text())
            flags = int((entry / "flags").read_text(), 16)
            operstate = (entry / "operstate").read_text().strip()
            uevent = (entry / "uevent").read_text()
        except (OSError, ValueError):
            continue
        devtype = next(
            (line[8:] for line in uevent.splitlines() if line.startswith("DEVTYPE=")), ""
        )
        links[entry.name] = Link(
            entry.name,
            mtu,
            up=bool(flags & IFF_UP) and operstate not in ("down", "lowerlayerdown", "notpresent"),
            loopback=bool(flags & IFF_LOOPBACK),
            tunnel=kind in TUNNEL_TYPES or devtype in TUNNEL_DEVTYPES,
        )
    return links


def check(
    tunnel: str = DEFAULT_TUNNEL,
    external_mtu: int | None = None,
    sys_net: Path | None = None,
    proc_route: Path | None = None,
) -> Verdict:
    """This node's verdict; MtuError if the tunnel or the network MTU cannot be found."""
    links = read_links(sys_net)
    proc_route = proc_route or PROC_ROUTE
    if tunnel not in links:
        raise MtuError(f"there is no interface {tunnel} here (is Calico in IPIP mode?)")
    if external_mtu is not None:
        return verdict(tunnel, links[tunnel].mtu, external_mtu)
    try:
        routes = parse_routes(proc_route.read_text())
    except OSError as exc:
        raise MtuError(f"cannot read the routes in {proc_route} ({exc.strerror})") from None
    network = network_links(links, routes, tunnel)
    if not network:
        raise MtuError(
            "no up, non-tunnel interface carries a default or network route here; "
            "state the network MTU with --external-mtu"
        )
    smallest = min(link.mtu for link in network)
    try:
        return verdict(
            tunnel,
            links[tunnel].mtu,
            smallest,
            [link.name for link in network if link.mtu == smallest],
        )
    except ValueError as exc:
        raise MtuError(str(exc)) from None


def log_check(tunnel: str = DEFAULT_TUNNEL) -> Verdict | None:
    """The agent's check at start: a warning if the tunnel's MTU is too large, else a line."""
    from overlay_vici.core import log

    try:
        result = check(tunnel)
    except MtuError as exc:
        log.info("MTU not checked", reason=str(exc))
        return None
    if result.ok:
        log.info("MTU ok", tunnel=tunnel, mtu=result.tunnel_mtu, largest=result.safe)
    else:
        log.warning(
            "MTU too large",
            tunnel=tunnel,
            mtu=result.tunnel_mtu,
            set_to=result.safe,
            network_mtu=result.external_mtu,
            message=result.message,
        )
    return result
