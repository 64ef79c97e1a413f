"""Faults, one at a time, on a 4-node mesh with traffic between every pair (UML guest).

Every node runs a real charon, a real agent (with its netfilter guard) and the local master
runs beside them; every ordered pair pings pod to pod at 20 probes/s through the fault.
Each test reports:

- plaintext: IPIP that reached a node unprotected (raw PREROUTING `--pol none`: kernel
  counters, exact) and IPIP frames a capture on the bridge saw (tcpdump may miss some);
  it must be 0 in every case;
- lost: probes without a reply, over all pairs;
- recovery: seconds from the fault until every pair is encrypted again and stays so: for
  each ordered pair an outbound SPI of one charon is an inbound SPI of the other's (sampled
  every 0.25 s), and no probe is lost after that; 0 when that never stopped being true.

With OVERLAY_VICI_RESULTS=FILE each result is appended to FILE as a JSON line;
`python tests/uml/test_faults.py FILE` prints them as the table in docs/faults.md.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from cluster import (
    LocalMaster,
    agent_events,
    loaded,
    status,
    wait_applied,
    wait_for,
    wait_phase,
    wait_rotated,
)
from faultbed import (
    FAST,
    Bed,
    Observation,
    assert_no_plaintext,
    bed_of,
    child_spis,
    guard_of,
    ike_sa_ids,
    ike_sas,
    ike_spis,
    restart_charon,
    session,
    text,
    wait_encrypted,
)
from mesh import SLOWDOWN, Node, ip_batch

from overlay_vici.agent.render import conn_name
from overlay_vici.core.contract import KEYRING_FILE
from overlay_vici.core.files import publish_secret


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[Bed]:
    with bed_of(tmp_path) as made:
        yield made


# --- the faults ----------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_charon_restart(bed: Bed, sig: signal.Signals) -> None:
    """SIGTERM removes charon's policies and SAs (IPIP would leave in plaintext but for the
    guard); SIGKILL leaves them in the kernel, unknown to the next charon."""
    node = bed.mesh.nodes[1]
    seen = Observation(bed.mesh)
    restart_charon(node, sig)
    back = time.time()
    wait_encrypted(bed.mesh.nodes)
    result = seen.finish(
        f"charon {sig.name} and restart (n2)", charon_back_after=round(back - seen.fault_at, 2)
    )
    assert_no_plaintext(result)
    assert result.recovery is not None and result.recovery < 10 * SLOWDOWN, result


def test_charon_sigterm_without_the_guard_leaks(tmp_path: Path) -> None:
    """The control: the same SIGTERM with the agents run with --no-guard. The counters see
    the plaintext the guard stops, so their zeros above mean something."""
    with bed_of(tmp_path, [*FAST, "--no-guard"]) as bed:
        node = bed.mesh.nodes[1]
        seen = Observation(bed.mesh)
        restart_charon(node, signal.SIGTERM)
        wait_encrypted(bed.mesh.nodes)
        result = seen.finish("control: charon SIGTERM and restart (n2), agents --no-guard")
    assert result.plaintext_received > 0, result


def test_agent_restart_loses_nothing(bed: Bed) -> None:
    """A new agent finds charon loaded: it neither tears down nor renegotiates an SA."""
    node = bed.mesh.nodes[1]
    seen = Observation(bed.mesh)
    before = {n.name: ike_sa_ids(n) for n in bed.mesh.nodes}
    agent = bed.cluster.agents[node.name]
    agent.send_signal(signal.SIGKILL)
    agent.wait()
    bed.cluster.start_agent(node)
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
    after = {n.name: ike_sa_ids(n) for n in bed.mesh.nodes}
    result = seen.finish("agent SIGKILL and restart (n2)")
    assert_no_plaintext(result)
    assert result.lost == 0, result
    assert after == before, "the agent restart replaced IKE_SAs"


def published_key(bed: Bed, node: Node) -> bytes | None:
    peer = bed.master.keyring().peer(node.name)
    return peer.pub if peer else None


def test_a_lost_node_key_is_replaced_and_its_pairs_follow(bed: Bed) -> None:
    """n2's key file is lost and its agent restarts: it makes a new key, the master publishes
    it, and every peer derives new PSKs for its pair with n2. The SAs up meanwhile stay (a
    PSK only authenticates new exchanges), so the key change loses nothing; a charon SIGKILL
    on n2 then proves the new keys authenticate: every pair is encrypted again, with no
    plaintext at any point."""
    node = bed.mesh.nodes[1]
    old_pub = published_key(bed, node)
    seen = Observation(bed.mesh)
    agent = bed.cluster.agents[node.name]
    agent.send_signal(signal.SIGKILL)
    agent.wait()
    (node.dir / "node.key").unlink()
    bed.cluster.start_agent(node)
    wait_for(
        "the master to publish n2's new public key",
        lambda: published_key(bed, node) not in (None, old_pub),
        timeout=30,
    )
    published = time.time()
    wait_applied(bed.master, bed.mesh.nodes)
    stopped = restart_charon(node, signal.SIGKILL)
    wait_encrypted(bed.mesh.nodes)
    result = seen.finish(
        "node key lost (n2): new key published, then charon SIGKILL",
        key_published_after=round(published - seen.fault_at, 2),
        charon_killed_after=round(stopped - seen.fault_at, 2),
    )
    assert_no_plaintext(result)
    assert result.recovery is not None, result
    killed = stopped - seen.fault_at
    assert all(at >= killed for _, at in result.lost_at), "lost before charon was killed"


def test_swanctl_load_all_with_an_empty_config_is_undone(bed: Bed) -> None:
    node = bed.mesh.nodes[1]
    empty = node.dir / "empty-swanctl.conf"
    empty.write_text("")
    wanted = loaded(node)
    seen = Observation(bed.mesh)
    agent = bed.cluster.agents[node.name]
    agent.send_signal(signal.SIGSTOP)  # what load-all left, before the agent's next pass
    try:
        node.swanctl("--load-all", "--file", str(empty))
        emptied = loaded(node)
    finally:
        agent.send_signal(signal.SIGCONT)
    wait_for("the agent to load everything again", lambda: loaded(node) == wanted, timeout=40)
    reloaded = time.time()
    wait_encrypted(bed.mesh.nodes)
    result = seen.finish(
        "swanctl --load-all, empty config (n2)",
        conns_left_by_load_all=len(emptied[0]),
        keys_left_by_load_all=len(emptied[1]),
        reloaded_after=round(reloaded - seen.fault_at, 2),
    )
    assert_no_plaintext(result)
    assert emptied == (set(), set())


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
    wait_encrypted(bed.mesh.nodes)
    history = doc["history"][-1]
    result = seen.finish(
        f"master SIGKILL in phase {phase}, restarted after 2 s",
        phase_at_kill=phase_at_kill,
        killed_after=round(killed - seen.fault_at, 2),
        rotation_done_after=round(done - seen.fault_at, 2),
        phases={k: round(v - seen.fault_at, 2) for k, v in history.items() if k != "rotation"},
    )
    assert_no_plaintext(result)
    assert phase_at_kill == phase
    assert master.keyring().sent == 2 and len(master.keyring().generations) == 1


BAD_SECRETS: dict[str, Callable[[str], bytes]] = {
    "garbage": lambda good: b"\x00\xff\x13 not a keyring",
    "a truncated file": lambda good: good.encode()[: len(good) // 2],
    "a 10 MB file": lambda good: b"{" + b" " * (10 * 1024 * 1024),
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
            f"{node.name}'s agent to reject {kind}",
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
    result = seen.finish(f"Secret replaced by {kind}", error=errors["n1"])
    for node in bed.mesh.nodes:  # the master's Secret is intact: give the nodes it back
        publish_secret(LocalMaster.keys(node), {KEYRING_FILE: good})
    assert_no_plaintext(result)
    assert result.lost == 0, result
    assert after == before
    for name, error in errors.items():
        assert f"keeping keyring serial {serial}" in error, (name, error)
        assert error.count(". ") == 0, error


@pytest.mark.parametrize("routes_first", [False, True], ids=["keyring first", "routes first"])
def test_node_ip_change_moves_its_sas(bed: Bed, routes_first: bool) -> None:
    """n4 moves from 10.99.0.4 to 10.99.0.14. The master publishes it, Calico's routes follow
    (or precede it: IPIP to the new address, which no policy covers yet, meets the guard's
    catch-all). The SAs on the old address are closed, new ones come up; the guard, which
    names no mesh node, is the same before and after."""
    mesh, master = bed.mesh, bed.master
    node = mesh.nodes[3]
    others = mesh.nodes[:3]
    old, new = node.ip, "10.99.0.14"
    serial = master.keyring().serial
    seen = Observation(mesh)
    # Old address first: deleting a primary address deletes its secondaries with it.
    ip_batch([f"addr del {old}/24 dev eth0", f"addr add {new}/24 dev eth0"], netns=node.name)
    node.ip = new

    def reroute() -> None:
        for peer in others:
            ip_batch([f"route replace {node.pod_cidr} via {new} dev tunl0 onlink"], netns=peer.name)

    if routes_first:
        reroute()
        time.sleep(1)
    master.write_nodes()
    wait_for("the new keyring", lambda: master.keyring().serial > serial, timeout=30)
    wait_applied(master, mesh.nodes)
    applied = time.time()
    if not routes_first:
        reroute()
    wait_encrypted(mesh.nodes)
    wait_for(
        "no IKE_SA left on the old address",
        lambda: (
            all(text(sa["remote-host"]) != old for n in others for _, sa in ike_sas(n))
            and all(text(sa["local-host"]) != old for _, sa in ike_sas(node))
        ),
        timeout=30,
    )
    gone = time.time()
    guards = {n.name: guard_of(n) for n in mesh.nodes}
    closed = sum(len(agent_events(n, "closing IKE_SA on an old address")) for n in mesh.nodes)
    order = "routes 1 s before the keyring" if routes_first else "keyring, then routes"
    result = seen.finish(
        f"node IP change (n4 .4 -> .14; {order})",
        keyring_applied_after=round(applied - seen.fault_at, 2),
        old_sas_gone_after=round(gone - seen.fault_at, 2),
        ike_sas_closed_on_old_address=closed,
    )
    assert guards == {n.name: () for n in mesh.nodes}, "whole, and no node outside the mesh"
    assert_no_plaintext(result)


def test_node_removed_while_its_sas_are_up(bed: Bed) -> None:
    """n4 is deleted like a VM (its processes and Calico's routes to it go), then the master
    drops it from the keyring: the others unload it and close their SAs with it."""
    mesh, master = bed.mesh, bed.master
    leaving = mesh.nodes[3]
    stable = mesh.nodes[:3]
    seen = Observation(mesh, pairs_of=stable)
    mesh.remove_node(leaving)
    master.write_nodes(stable)
    wait_applied(master, stable)
    for node in stable:
        wait_for(
            f"{node.name} to drop {leaving.name}",
            lambda n=node: (
                conn_name(leaving.name) not in (child_spis(n) or {})
                and conn_name(leaving.name) not in loaded(n)[0]
            ),
            timeout=30,
        )
    dropped = time.time()
    guards = {n.name: guard_of(n) for n in stable}
    result = seen.finish(
        "node removed with its SAs up (n4)",
        survivors=stable,
        peer_dropped_after=round(dropped - seen.fault_at, 2),
    )
    assert_no_plaintext(result)
    assert result.lost == 0, result
    assert guards == {n.name: () for n in stable}, "whole, and no node outside the mesh"


@contextlib.contextmanager
def ike_held_between(a: Node, b: Node) -> Iterator[None]:
    """Drop the IKE packets a and b send each other (UDP 500, no NAT here) while inside."""
    rules = [(a, b), (b, a)]
    for node, peer in rules:
        node.run(iptables(node, "-I", peer))
    try:
        yield
    finally:
        for node, peer in rules:
            node.run(iptables(node, "-D", peer))


def iptables(node: Node, verb: str, peer: Node) -> list[str]:
    rule = ["OUTPUT", "-p", "udp", "-d", peer.ip, "--dport", "500", "-j", "DROP"]
    return [f"iptables-{node.guard_backend}", "-w", "10", verb, *rule]


def ike_states(node: Node, conn: str) -> list[str]:
    return [text(sa["state"]) for c, sa in ike_sas(node) if c == conn]


def test_both_ends_initiate_at_once(bed: Bed) -> None:
    """n1 and n2 lose their IKE_SA and both initiate while their IKE packets to each other are
    held, so both IKE_SA_INITs are on the way when the path opens: a duplicate is certain, not
    a race to provoke. It is cleaned up: n1 (the lower IP) closes a duplicate both ends hold;
    n2 closes the half that INITIAL_CONTACT left it alone with. In the end both hold the same
    single IKE_SA."""
    a, b = bed.mesh.nodes[:2]
    ab, ba = conn_name(b.name), conn_name(a.name)
    seen = Observation(bed.mesh)
    with ike_held_between(a, b):
        for node, conn in ((a, ab), (b, ba)):
            with session(node) as s:
                list(s.terminate({"ike": conn, "force": "yes"}))
                s.request("initiate", {"ike": conn, "child": "ipip", "timeout": "-1"})
        wait_for(
            "n1 and n2 each to have an IKE_SA_INIT on the way",
            lambda: ike_states(a, ab) == ["CONNECTING"] and ike_states(b, ba) == ["CONNECTING"],
            timeout=10,
            interval=0.1,
        )
    most = 0
    deadline = time.monotonic() + 20  # charon retransmits after 4 s, then 7.2 s more
    while most < 2 and time.monotonic() < deadline:
        most = max(most, len(ike_spis(a, ab)), len(ike_spis(b, ba)))
        time.sleep(0.05)
    wait_for(
        "n1 and n2 to hold the same single IKE_SA",
        lambda: len(spis := ike_spis(a, ab)) == 1 and spis == ike_spis(b, ba),
        timeout=30,
        interval=0.1,
    )
    single = time.time()
    wait_encrypted(bed.mesh.nodes)
    closed = [e for e in agent_events(a, "closing duplicate IKE_SA") if e.get("peer") == ab]
    orphans = [
        e for e in agent_events(b, "closing IKE_SA its peer no longer has") if e.get("peer") == ba
    ]
    result = seen.finish(
        "both ends initiate at once (n1, n2)",
        most_ike_sas=most,
        one_ike_sa_after=round(single - seen.fault_at, 2),
        duplicates_closed_by_n1=len(closed),
        orphans_closed_by_n2=len(orphans),
    )
    assert_no_plaintext(result)
    assert most >= 2, "both IKE_SA_INITs crossed, yet no end held two IKE_SAs"
    assert closed or orphans, "a duplicate arose and no agent closed it"


# --- the table for docs/faults.md -----------------------------------------------------------


def table(lines: Sequence[str]) -> str:
    rows = [
        "| fault | plaintext IPIP (counters + capture) | probes lost / sent "
        "| every pair encrypted again after | guard drops |",
        "|---|---:|---:|---:|---:|",
    ]
    for line in lines:
        r = json.loads(line)
        recovery = "never" if r["recovery"] is None else f"{r['recovery']:.2f} s"
        rows.append(
            f"| {r['fault']} | {r['plaintext_received']} + {r['plaintext_captured']} "
            f"| {r['lost']} / {r['sent']} | {recovery} | {r['guard_drops']} |"
        )
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(table(Path(sys.argv[1]).read_text().splitlines()), end="")
