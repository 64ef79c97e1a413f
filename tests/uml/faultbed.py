"""The fault bed: a 4-node mesh with master, agents and guards, traffic between every pair,
and what a fault is measured by (plaintext counters, lost probes, recovery time). Shared by
test_faults.py (UML and qemu guests) and test_distro_kernel.py (qemu guest only)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import vici
from cluster import (
    Cluster,
    LocalMaster,
    lost_at,
    wait_applied,
    wait_for,
)
from mesh import PING_INTERVAL, Mesh, Node, Pinger

from overlay_vici.agent.guard_plan import GuardPeer, installed_outside
from overlay_vici.agent.render import conn_name, strongswan_conf

FAST = ["--resync", "2", "--reauth-jitter", "1"]
MASTER = ["--tick", "0.5", "--agent-timeout", "8s"]
NODES = 4
SETTLE = 2.0  # seconds of traffic after recovery, to see that it holds
SAMPLE = 0.25  # seconds between samples of "every pair encrypted"


# --- what each fault reports --------------------------------------------------------------


@dataclass
class Result:
    fault: str
    plaintext_received: int
    plaintext_captured: int
    lost: int
    sent: int
    recovery: float | None  # seconds; None: not within the test's time
    guard_drops: int  # IPIP the guards dropped for want of IPsec (incl. trap hits: see docs)
    longest_outage: float
    xfrm_errors: dict[str, int] = field(default_factory=dict)
    lost_at: list[tuple[str, float]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)


def record(result: Result) -> None:
    line = json.dumps(asdict(result))
    print(f"\nFAULT RESULT {line}")
    path = os.environ.get("OVERLAY_VICI_RESULTS")
    if path:
        with open(path, "a") as out:
            out.write(line + "\n")


# --- observing the mesh -------------------------------------------------------------------


@contextlib.contextmanager
def session(node: Node) -> Iterator[vici.Session]:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(5)
    try:
        sock.connect(str(node.vici_socket))
        yield vici.Session(sock)
    finally:
        sock.close()


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def ike_sas(node: Node) -> list[tuple[str, dict[str, Any]]]:
    """(connection, IKE_SA) for every IKE_SA charon holds."""
    with session(node) as s:
        return [
            (text(c), sa) for entry in s.list_sas({"noblock": "yes"}) for c, sa in entry.items()
        ]


def child_spis(node: Node) -> dict[str, tuple[set[str], set[str]]] | None:
    """Per connection, the (inbound, outbound) SPIs of its installed CHILD_SAs; None while
    charon does not answer (restarting)."""
    try:
        sas = ike_sas(node)
    except (OSError, vici.exception.SessionException):
        return None
    result: dict[str, tuple[set[str], set[str]]] = {}
    for conn, sa in sas:
        spis = result.setdefault(conn, (set(), set()))
        for child in (sa.get("child-sas") or {}).values():
            if text(child.get("state", b"")) == "INSTALLED":
                spis[0].add(text(child["spi-in"]))
                spis[1].add(text(child["spi-out"]))
    return result


def ike_sa_ids(node: Node) -> set[str]:
    return {text(sa["uniqueid"]) for _, sa in ike_sas(node)}


def ike_spis(node: Node, conn: str) -> list[tuple[str, str]]:
    """(initiator SPI, responder SPI) of the connection's established IKE_SAs."""
    return sorted(
        (text(sa["initiator-spi"]), text(sa["responder-spi"]))
        for c, sa in ike_sas(node)
        if c == conn and text(sa["state"]) == "ESTABLISHED"
    )


def all_pairs_encrypted(nodes: Sequence[Node]) -> bool:
    """Every ordered pair has an SA both charons hold: a's outbound SPI is b's inbound."""
    spis = {node.name: child_spis(node) for node in nodes}
    for a in nodes:
        for b in nodes:
            if a is b:
                continue
            sa, sb = spis[a.name], spis[b.name]
            if sa is None or sb is None:
                return False
            if (
                not sa.get(conn_name(b.name), (set(), set()))[1]
                & sb.get(conn_name(a.name), (set(), set()))[0]
            ):
                return False
    return True


def wait_encrypted(nodes: Sequence[Node], timeout: float = 90) -> None:
    wait_for("every pair encrypted", lambda: all_pairs_encrypted(nodes), timeout, SAMPLE)


_GUARD_DROP = re.compile(r"^\[(\d+):\d+\] -A OVERLAY-VICI-GUARD-\S+ .*-j DROP$", re.M)


def guard_drops(nodes: Sequence[Node]) -> dict[str, int]:
    """Per node, the packets its guard dropped (both directions, since its last rewrite)."""
    drops = {}
    for node in nodes:
        saved = "".join(node.iptables_save("-c", "-t", table) for table in ("raw", "mangle"))
        drops[node.name] = sum(int(n) for n in _GUARD_DROP.findall(saved))
    return drops


def guard_of(node: Node) -> tuple[GuardPeer, ...] | None:
    """The node's installed guard: its allow-list if it is whole, else None."""
    return installed_outside({t: node.iptables_save("-t", t) for t in ("raw", "mangle")})


def xfrm_stats(node: Node) -> dict[str, int]:
    """The node kernel's IPsec error counters (/proc/net/xfrm_stat): where lost probes went."""
    text = node.run(["cat", "/proc/net/xfrm_stat"]).stdout
    return {name: int(value) for name, value in (line.split() for line in text.splitlines())}


class Observation:
    """Counters, capture, pings, XFRM errors and "every pair encrypted" around one fault."""

    def __init__(self, mesh: Mesh, pairs_of: Sequence[Node] | None = None) -> None:
        self.mesh = mesh
        self.nodes = list(pairs_of or mesh.nodes)
        self.pinger = Pinger(self.nodes, mesh.workdir / "ping-fault")
        self.counters_before = mesh.read_counters()
        self.guard_before = guard_drops(mesh.nodes)
        self.xfrm_before = {node.name: xfrm_stats(node) for node in mesh.nodes}
        self.capture = mesh.capture()
        self.pinger.start()
        time.sleep(1.0)  # traffic flows before the fault
        assert all_pairs_encrypted(self.nodes), "the mesh was not encrypted before the fault"
        self.samples: list[tuple[float, bool]] = []
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._sample, daemon=True)
        self.fault_at = time.time()
        self._monitor.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), all_pairs_encrypted(self.nodes)))
            self._stop.wait(SAMPLE)

    def finish(self, fault: str, survivors: Sequence[Node] | None = None, **notes: Any) -> Result:
        """Stop observing after SETTLE more seconds of traffic; record and return the result.
        `survivors`: the nodes still there (a removed node's counters are gone with it)."""
        time.sleep(SETTLE)
        self._stop.set()
        self._monitor.join()
        stats = self.pinger.stop()
        kinds = self.capture.stop()
        survivors = list(survivors or self.mesh.nodes)
        received = sum(
            node.read_counters().plain_ipip - self.counters_before[node.name].plain_ipip
            for node in survivors
        )
        guard = 0
        for name, count in guard_drops(survivors).items():
            before = self.guard_before[name]
            guard += count - before if count >= before else count  # rewritten: counts anew
        xfrm: dict[str, int] = {}
        by_node: dict[str, dict[str, int]] = {}
        for node in survivors:
            for key, value in xfrm_stats(node).items():
                delta = value - self.xfrm_before[node.name].get(key, 0)
                if delta:
                    xfrm[key] = xfrm.get(key, 0) + delta
                    by_node.setdefault(node.name, {})[key] = delta
        notes = {**notes, "xfrm_errors_by_node": by_node}
        losses = lost_at(self.pinger)
        result = Result(
            fault=fault,
            plaintext_received=received,
            plaintext_captured=kinds.get("ipip", 0),
            lost=sum(s.lost for s in stats.values()),
            sent=sum(s.sent for s in stats.values()),
            recovery=self._recovery([t for _, t in losses]),
            guard_drops=guard,
            longest_outage=max(s.longest_outage for s in stats.values()),
            xfrm_errors=xfrm,
            lost_at=[(pair, round(t - self.fault_at, 2)) for pair, t in losses],
            notes=notes,
        )
        record(result)
        return result

    def _recovery(self, lost: list[float]) -> float | None:
        broken = [t for t, ok in self.samples if not ok]
        if self.samples and not self.samples[-1][1]:
            return None
        back = self.fault_at
        if broken:
            back = min(t for t, ok in self.samples if ok and t > max(broken))
        end = max([back] + [t + PING_INTERVAL for t in lost])
        return round(max(end - self.fault_at, 0.0), 2)


def assert_no_plaintext(result: Result) -> None:
    assert result.plaintext_received == 0, result
    assert result.plaintext_captured == 0, result


# --- the mesh ------------------------------------------------------------------------------


@dataclass
class Bed:
    mesh: Mesh
    master: LocalMaster
    cluster: Cluster


@contextlib.contextmanager
def bed_of(
    workdir: Path,
    agent_args: Sequence[str] = FAST,
    prepare: Callable[[Mesh], object] = lambda mesh: None,
) -> Iterator[Bed]:
    """The 4-node mesh with master and agents; `prepare` sets the nodes up before they start."""
    with Mesh(NODES, workdir) as mesh, LocalMaster(mesh, MASTER) as master:
        prepare(mesh)
        master.start()
        cluster = Cluster(mesh, agent_args, keys=LocalMaster.keys)
        for node in mesh.nodes:
            cluster.start(node)
        wait_applied(master, mesh.nodes)
        mesh.install_ipip_counters()
        warm_up(mesh.nodes)
        yield Bed(mesh, master, cluster)


def warm_up(nodes: Sequence[Node]) -> None:
    """Every pair encrypted and its traffic flowing before the fault, and settled: start-up
    may leave duplicate IKE_SAs, which the agents close within seconds; a fault test must not
    count that work as its own."""
    pinger = Pinger(nodes, nodes[0].dir.parent / "ping-warm-up")
    pinger.start()
    try:
        wait_encrypted(nodes, timeout=60)
        wait_for("one IKE_SA per pair, the same at both ends", lambda: settled(nodes), 30)
        time.sleep(1)
    finally:
        pinger.stop()


def settled(nodes: Sequence[Node]) -> bool:
    for a in nodes:
        for b in nodes:
            if a.index < b.index:
                spis = ike_spis(a, conn_name(b.name))
                if len(spis) != 1 or spis != ike_spis(b, conn_name(a.name)):
                    return False
    return True


def restart_charon(node: Node, sig: signal.Signals) -> float:
    """Stop charon with `sig`, start it again; returns when it was stopped."""
    node.stop_charon(sig)
    stopped = time.time()
    node.start_charon(strongswan_conf(str(node.vici_socket), str(node.charon_log)))
    node.wait_vici()
    return stopped
