"""Faults, one at a time, on a 4-node mesh with traffic between every pair (UML guest).

Every node runs a real charon, a real agent (with its netfilter guard) and the local master;
every ordered pair pings pod to pod at 20 probes/s through the fault. Each test reports:

- plaintext: IPIP that reached a node unprotected (raw PREROUTING `--pol none`, kernel
  counters, exact) plus IPIP frames a capture on the bridge saw (tcpdump may miss some);
  it must be 0 in every case;
- lost: probes without reply, over all 12 pairs;
- recovery: seconds from the fault until every pair is encrypted again, i.e. for each
  ordered pair an outbound SPI of one charon is an inbound SPI of the other's (and no probe
  is lost after that).

With OVERLAY_VICI_RESULTS=FILE each result is appended to FILE as a JSON line;
`python tests/uml/test_faults.py FILE` prints them as the table in docs/faults.md.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
import vici
from cluster import Cluster, LocalMaster, agent_events, loaded, status, wait_for
from mesh import Mesh, Node, Pinger
from test_rotation_mesh import lost_at, wait_applied, wait_phase, wait_rotated

from overlay_vici.files import KEYRING_FILE, publish_secret
from overlay_vici.render import conn_name, strongswan_conf

FAST = ["--resync", "2", "--reauth-jitter", "1"]
MASTER = ["--tick", "0.5", "--agent-timeout", "8s"]
NODES = 4
SETTLE = 2.0  # seconds of traffic after recovery, to see that it holds


# --- what each fault reports --------------------------------------------------------------


@dataclass
class Result:
    fault: str
    plaintext_received: int
    plaintext_captured: int
    lost: int
    sent: int
    recovery: float | None  # seconds; None: never within the test's time
    guard_drops: int  # unprotected IPIP the guard dropped (sent or received)
    longest_outage: float
    xfrm_errors: dict[str, int] = field(default_factory=dict)
    lost_at: list[tuple[str, float]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def plaintext(self) -> int:
        return self.plaintext_received + self.plaintext_captured


def record(result: Result) -> None:
    line = json.dumps({**asdict(result), "plaintext": result.plaintext})
    print(f"\nFAULT RESULT {line}")
    path = os.environ.get("OVERLAY_VICI_RESULTS")
    if path:
        with open(path, "a") as out:
            out.write(line + "\n")


# --- observing the mesh -------------------------------------------------------------------


def _session(node: Node) -> vici.Session:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(5)
    sock.connect(str(node.vici_socket))
    return vici.Session(sock)


def child_spis(node: Node) -> dict[str, tuple[set[str], set[str]]] | None:
    """Per connection, the (inbound, outbound) SPIs of its installed CHILD_SAs; None while
    charon does not answer (restarting)."""
    try:
        session = _session(node)
        try:
            result: dict[str, tuple[set[str], set[str]]] = {}
            for entry in session.list_sas({"noblock": "yes"}):
                for conn, sa in entry.items():
                    spis = result.setdefault(_text(conn), (set(), set()))
                    for child in (sa.get("child-sas") or {}).values():
                        if _text(child.get("state", b"")) == "INSTALLED":
                            spis[0].add(_text(child["spi-in"]))
                            spis[1].add(_text(child["spi-out"]))
            return result
        finally:
            session.transport.close()
    except (OSError, vici.exception.SessionException):
        return None


def ike_sa_count(node: Node) -> dict[str, int]:
    session = _session(node)
    try:
        counts: dict[str, int] = {}
        for entry in session.list_sas({"noblock": "yes"}):
            for conn, sa in entry.items():
                if _text(sa.get("state", b"")) == "ESTABLISHED":
                    counts[_text(conn)] = counts.get(_text(conn), 0) + 1
        return counts
    finally:
        session.transport.close()


def ike_sa_ids(node: Node) -> set[str]:
    session = _session(node)
    try:
        return {_text(sa["uniqueid"]) for entry in session.list_sas() for sa in entry.values()}
    finally:
        session.transport.close()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def all_pairs_encrypted(nodes: Sequence[Node]) -> bool:
    """Every ordered pair has an SA both charons hold: a's outbound SPI is b's inbound."""
    spis = {node.name: child_spis(node) for node in nodes}
    if any(s is None for s in spis.values()):
        return False
    for a in nodes:
        for b in nodes:
            if a is b:
                continue
            out_a = spis[a.name].get(conn_name(b.name), (set(), set()))[1]  # type: ignore[union-attr]
            in_b = spis[b.name].get(conn_name(a.name), (set(), set()))[0]  # type: ignore[union-attr]
            if not out_a & in_b:
                return False
    return True


def wait_encrypted(nodes: Sequence[Node], timeout: float = 90) -> float:
    """Poll until every pair is encrypted; returns the time.time() it was first seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all_pairs_encrypted(nodes):
            return time.time()
        time.sleep(0.25)
    raise TimeoutError(f"not every pair encrypted after {timeout}s")


_GUARD_DROP = re.compile(r"^\[(\d+):\d+\] -A OVERLAY-VICI-GUARD-\S+ .*-j DROP$", re.M)


def guard_drops(nodes: Sequence[Node]) -> dict[str, int]:
    """Per node, the packets its guard dropped (both directions)."""
    drops = {}
    for node in nodes:
        saved = "".join(
            node.run(["iptables-legacy-save", "-c", "-t", table]).stdout
            for table in ("raw", "mangle")
        )
        drops[node.name] = sum(int(n) for n in _GUARD_DROP.findall(saved))
    return drops


def xfrm_stats(node: Node) -> dict[str, int]:
    """The node kernel's IPsec error counters (/proc/net/xfrm_stat): where lost probes went."""
    text = node.run(["cat", "/proc/net/xfrm_stat"]).stdout
    return {name: int(value) for name, value in (line.split() for line in text.splitlines())}


class Observation:
    """Counters, capture, pings and XFRM errors around one fault."""

    def __init__(self, mesh: Mesh, pairs_of: Sequence[Node] | None = None) -> None:
        self.mesh = mesh
        self.pinger = Pinger(list(pairs_of or mesh.nodes), mesh.workdir / "ping-fault")
        self.counters_before = mesh.read_counters()
        self.guard_before = guard_drops(mesh.nodes)
        self.xfrm_before = {node.name: xfrm_stats(node) for node in mesh.nodes}
        self.capture = mesh.capture()
        self.pinger.start()
        time.sleep(1.0)  # traffic flows before the fault
        self.fault_at = time.time()

    def finish(
        self,
        fault: str,
        recovered_at: float | None,
        survivors: Sequence[Node] | None = None,
        **notes: Any,
    ) -> Result:
        """Stop observing after SETTLE more seconds of traffic; record and return the result.
        `survivors`: the nodes still there (a removed node's counters are gone with it)."""
        time.sleep(SETTLE)
        stats = self.pinger.stop()
        kinds = self.capture.stop()
        survivors = list(survivors or self.mesh.nodes)
        received = sum(
            node.read_counters().plain_ipip - self.counters_before[node.name].plain_ipip
            for node in survivors
        )
        guard = guard_drops(survivors)
        xfrm: dict[str, int] = {}
        for node in survivors:
            for key, value in xfrm_stats(node).items():
                delta = value - self.xfrm_before[node.name].get(key, 0)
                if delta:
                    xfrm[key] = xfrm.get(key, 0) + delta
        losses = lost_at(self.pinger)
        last_loss = max((t for _, t in losses), default=None)
        recovery = None
        if recovered_at is not None:
            end = max(recovered_at, (last_loss or 0) + 0.05)
            recovery = round(max(end - self.fault_at, 0.0), 2)
        result = Result(
            fault=fault,
            plaintext_received=received,
            plaintext_captured=kinds.get("ipip", 0),
            lost=sum(s.lost for s in stats.values()),
            sent=sum(s.sent for s in stats.values()),
            recovery=recovery,
            guard_drops=sum(n - self.guard_before[name] for name, n in guard.items()),
            longest_outage=max(s.longest_outage for s in stats.values()),
            xfrm_errors=xfrm,
            lost_at=[(pair, round(t - self.fault_at, 2)) for pair, t in losses],
            notes=notes,
        )
        record(result)
        self.stats = stats
        return result


def assert_no_plaintext(result: Result) -> None:
    assert result.plaintext_received == 0, result
    assert result.plaintext_captured == 0, result


# --- the mesh ------------------------------------------------------------------------------


@dataclass
class Bed:
    mesh: Mesh
    master: LocalMaster
    cluster: Cluster


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[Bed]:
    with Mesh(NODES, tmp_path) as mesh, LocalMaster(mesh, MASTER) as master:
        master.start()
        cluster = Cluster(mesh, FAST, keys=LocalMaster.keys)
        for node in mesh.nodes:
            cluster.start(node)
        wait_applied(master, mesh.nodes)
        mesh.install_ipip_counters()
        warm_up(mesh.nodes)
        yield Bed(mesh, master, cluster)


def warm_up(nodes: Sequence[Node]) -> None:
    """Every pair encrypted and its traffic flowing before the fault."""
    pinger = Pinger(nodes, nodes[0].dir.parent / "ping-warm-up")
    pinger.start()
    try:
        wait_encrypted(nodes, timeout=60)
        time.sleep(1)
    finally:
        pinger.stop()


def restart_charon(node: Node, sig: signal.Signals) -> None:
    node.stop_charon(sig)
    node.start_charon(strongswan_conf(str(node.vici_socket), str(node.charon_log)))
    node.wait_vici()


# --- the faults ----------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_charon_restart(bed: Bed, sig: signal.Signals) -> None:
    """SIGTERM removes charon's policies and SAs (IPIP would leave in plaintext without the
    guard); SIGKILL leaves them in the kernel, unknown to the next charon."""
    node = bed.mesh.nodes[1]
    seen = Observation(bed.mesh)
    restart_charon(node, sig)
    restarted = time.time()
    recovered = wait_encrypted(bed.mesh.nodes)
    result = seen.finish(
        f"charon {sig.name} and restart (n2)",
        recovered,
        charon_back_after=round(restarted - seen.fault_at, 2),
        agent_reloaded=len(agent_events(node, "reconciled")),
    )
    assert_no_plaintext(result)
    if sig is signal.SIGTERM:
        assert result.guard_drops > 0, "the guard should have dropped the unprotected IPIP"
    assert result.recovery is not None and result.recovery < 30, result


def test_agent_restart_loses_nothing(bed: Bed) -> None:
    """A new agent finds charon loaded: it neither tears down nor renegotiates an SA."""
    node = bed.mesh.nodes[1]
    before = {n.name: ike_sa_ids(n) for n in bed.mesh.nodes}
    seen = Observation(bed.mesh)
    agent = bed.cluster.agents[node.name]
    agent.send_signal(signal.SIGKILL)
    agent.wait()
    bed.cluster.start_agent(node)
    recovered = wait_encrypted(bed.mesh.nodes)  # it never stopped being
    serial = bed.master.keyring().serial
    wait_for(
        "the new agent's first pass",
        lambda: (
            (s := status(node) or {}).get("updated", 0) > seen.fault_at
            and s.get("keyring_serial") == serial
        ),
        timeout=30,
    )
    time.sleep(3)  # a few resyncs of the new agent
    assert all_pairs_encrypted(bed.mesh.nodes)
    after = {n.name: ike_sa_ids(n) for n in bed.mesh.nodes}
    result = seen.finish("agent SIGKILL and restart (n2)", recovered)
    assert_no_plaintext(result)
    assert result.lost == 0, result
    assert after == before, "the agent restart replaced IKE_SAs"


def test_swanctl_load_all_with_an_empty_config_is_undone(bed: Bed) -> None:
    node = bed.mesh.nodes[1]
    empty = node.dir / "empty-swanctl.conf"
    empty.write_text("")
    wanted = loaded(node)
    seen = Observation(bed.mesh)
    node.swanctl("--load-all", "--file", str(empty))
    emptied = loaded(node)
    wait_for("the agent to load everything again", lambda: loaded(node) == wanted, timeout=30)
    reloaded = time.time()
    recovered = wait_encrypted(bed.mesh.nodes)
    result = seen.finish(
        "swanctl --load-all, empty config (n2)",
        recovered,
        conns_left_by_load_all=len(emptied[0]),
        reloaded_after=round(reloaded - seen.fault_at, 2),
    )
    assert_no_plaintext(result)
    assert result.recovery is not None and result.recovery < 30, result


@pytest.mark.parametrize("phase", ["stage", "switch", "retire"])
def test_master_killed_in_a_rotation_phase(bed: Bed, phase: str) -> None:
    """The master dies mid-rotation and comes back: it resumes where the Secret says."""
    master = bed.master
    seen = Observation(bed.mesh)
    master.rotate()
    wait_phase(master, phase)
    assert master.process is not None
    master.process.send_signal(signal.SIGKILL)
    master.process.wait()
    master.process = None
    killed = time.time()
    phase_at_kill = master.state_doc().get("phase")
    time.sleep(2)
    master.start()
    doc = wait_rotated(master, 1, timeout=120)
    wait_applied(master, bed.mesh.nodes)
    done = time.time()
    recovered = wait_encrypted(bed.mesh.nodes)
    result = seen.finish(
        f"master SIGKILL in phase {phase}, restarted",
        recovered,
        killed_after=round(killed - seen.fault_at, 2),
        phase_at_kill=phase_at_kill,
        rotation_done_after=round(done - seen.fault_at, 2),
        phases={
            k: round(v - seen.fault_at, 2) for k, v in doc["history"][-1].items() if k != "rotation"
        },
    )
    assert_no_plaintext(result)
    assert phase_at_kill == phase
    assert master.keyring().sent == 2 and len(master.keyring().generations) == 1


BAD_SECRETS: dict[str, Callable[[str], bytes]] = {
    "garbage": lambda good: b"\x00\xff\x13 not a keyring",
    "truncated": lambda good: good.encode()[: len(good) // 2],
    "10 MB": lambda good: b"{" + b" " * (10 * 1024 * 1024),
}


@pytest.mark.parametrize("kind", list(BAD_SECRETS))
def test_bad_secret_keeps_the_last_good_keys(bed: Bed, kind: str) -> None:
    """The Secret is replaced (every node's mount): each agent keeps its keys, says why."""
    good = bed.master.snapshot().keyring
    serial = bed.master.keyring().serial
    before = {n.name: loaded(n) for n in bed.mesh.nodes}
    seen = Observation(bed.mesh)
    bad = BAD_SECRETS[kind](good).decode("latin-1")
    for node in bed.mesh.nodes:
        publish_secret(LocalMaster.keys(node), {KEYRING_FILE: bad})
    errors = {}
    for node in bed.mesh.nodes:
        report = wait_for(
            f"{node.name}'s agent to reject the {kind} Secret",
            lambda n=node: (
                (s := status(n) or {}).get("updated", 0) > seen.fault_at
                and s.get("last_error")
                and s
            ),
            timeout=20,
        )
        errors[node.name] = report["last_error"]
    time.sleep(2)
    after = {n.name: loaded(n) for n in bed.mesh.nodes}
    recovered = wait_encrypted(bed.mesh.nodes)
    result = seen.finish(f"Secret replaced by {kind}", recovered, error=errors["n1"])
    for node in bed.mesh.nodes:  # the master's Secret is intact: give the nodes it back
        publish_secret(LocalMaster.keys(node), {KEYRING_FILE: good})
    assert_no_plaintext(result)
    assert result.lost == 0, result
    assert after == before
    for name, error in errors.items():
        assert f"keeping keyring serial {serial}" in error, (name, error)
        assert error.count(". ") == 0, error


def test_node_ip_change_moves_its_sas(bed: Bed) -> None:
    """n4 moves from 10.99.0.4 to 10.99.0.14; the master publishes it, then Calico's routes
    follow. Old SAs to the old address go, new ones come up, the guard follows."""
    mesh, master = bed.mesh, bed.master
    node = mesh.nodes[3]
    old, new = node.ip, "10.99.0.14"
    seen = Observation(mesh)
    node.run(["ip", "addr", "add", f"{new}/24", "dev", "eth0"])
    node.run(["ip", "addr", "del", f"{old}/24", "dev", "eth0"])
    node.ip = new
    master.write_nodes()
    wait_applied(master, mesh.nodes)
    applied = time.time()
    for peer in mesh.nodes:
        if peer is not node:
            peer.run(["ip", "route", "replace", node.pod_cidr, "via", new, "dev", "tunl0",
                      "onlink"])  # fmt: skip
    recovered = wait_encrypted(mesh.nodes)
    others = [n for n in mesh.nodes if n is not node]
    wait_for(
        "no IKE_SA left on the old address",
        lambda: (
            not any(old in sas_remote_hosts(n) for n in others) and old not in sas_local_hosts(node)
        ),
        timeout=60,
    )
    gone = time.time()
    guards = {n.name: n.run(["iptables-legacy-save", "-t", "raw"]).stdout for n in mesh.nodes}
    result = seen.finish(
        "node IP change (n4 .4 -> .14)",
        recovered,
        keyring_applied_after=round(applied - seen.fault_at, 2),
        old_sas_gone_after=round(gone - seen.fault_at, 2),
    )
    assert_no_plaintext(result)
    for name, saved in guards.items():
        if name != node.name:
            assert f"-d {new}/32" in saved and f"-d {old}/32" not in saved, saved


def sas_remote_hosts(node: Node) -> set[str]:
    return _sa_hosts(node, "remote-host")


def sas_local_hosts(node: Node) -> set[str]:
    return _sa_hosts(node, "local-host")


def _sa_hosts(node: Node, key: str) -> set[str]:
    session = _session(node)
    try:
        return {_text(sa[key]) for entry in session.list_sas() for sa in entry.values()}
    finally:
        session.transport.close()


def test_node_removed_while_its_sas_are_up(bed: Bed) -> None:
    mesh, master = bed.mesh, bed.master
    leaving = mesh.nodes[3]
    stable = mesh.nodes[:3]
    seen = Observation(mesh, pairs_of=stable)
    mesh.remove_node(leaving)  # the VM is gone: its charon, agent and routes with it
    master.write_nodes(stable)
    wait_applied(master, stable)
    for node in stable:
        wait_for(
            f"{node.name} to drop {leaving.name}",
            lambda n=node: (
                conn_name(leaving.name) not in child_spis(n)  # type: ignore[operator]
                and conn_name(leaving.name) not in loaded(n)[0]
            ),
            timeout=30,
        )
    dropped = time.time()
    recovered = wait_encrypted(stable)
    guards = {n.name: n.run(["iptables-legacy-save", "-t", "raw"]).stdout for n in stable}
    result = seen.finish(
        "node removed with SAs up (n4)",
        recovered,
        survivors=stable,
        peers_dropped_after=round(dropped - seen.fault_at, 2),
    )
    assert_no_plaintext(result)
    assert result.lost == 0, result
    for saved in guards.values():
        assert f"-d {leaving.ip}/32" not in saved


def test_both_ends_initiate_at_once(bed: Bed) -> None:
    """n1 and n2 drop their IKE_SA and both initiate at the same instant: the duplicate
    IKE_SA is closed by the lower-IP end (n1), which keeps the one it initiated."""
    a, b = bed.mesh.nodes[:2]
    seen = Observation(bed.mesh)
    session = _session(a)
    list(session.terminate({"ike": conn_name(b.name), "timeout": "5000"}))
    session.transport.close()
    go = threading.Barrier(2)

    def initiate(node: Node, peer: Node) -> None:
        s = _session(node)
        go.wait()
        s.request("initiate", {"ike": conn_name(peer.name), "child": "ipip", "timeout": "-1",
                               "init-limits": "no"})  # fmt: skip
        s.transport.close()

    threads = [threading.Thread(target=initiate, args=p) for p in ((a, b), (b, a))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    most = 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        counts = (
            ike_sa_count(a).get(conn_name(b.name), 0),
            ike_sa_count(b).get(conn_name(a.name), 0),
        )
        most = max(most, *counts)
        if most > 1 and counts == (1, 1):
            break
        time.sleep(0.2)
    single = time.time()
    recovered = wait_encrypted(bed.mesh.nodes)
    closed = [
        e for e in agent_events(a, "closing duplicate IKE_SA") if e.get("peer") == conn_name(b.name)
    ]
    result = seen.finish(
        "both ends initiate at once (n1, n2)",
        recovered,
        most_ike_sas=most,
        single_after=round(single - seen.fault_at, 2),
        duplicates_closed_by_n1=len(closed),
    )
    assert_no_plaintext(result)
    assert ike_sa_count(a)[conn_name(b.name)] == 1 and ike_sa_count(b)[conn_name(a.name)] == 1


# --- the table for docs/faults.md -----------------------------------------------------------


def table(lines: Sequence[str]) -> str:
    rows = [
        "| fault | plaintext IPIP (counters + capture) | guard drops | probes lost / sent "
        "| all pairs encrypted again after |",
        "|---|---:|---:|---:|---:|",
    ]
    for line in lines:
        r = json.loads(line)
        recovery = "-" if r["recovery"] is None else f"{r['recovery']:.1f} s"
        rows.append(
            f"| {r['fault']} | {r['plaintext_received']} + {r['plaintext_captured']} "
            f"| {r['guard_drops']} | {r['lost']} / {r['sent']} | {recovery} |"
        )
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(table(Path(sys.argv[1]).read_text().splitlines()), end="")
