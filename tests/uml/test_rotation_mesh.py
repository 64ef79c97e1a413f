"""Key rotation end to end: `overlay-vici master --local` driving real agents and charons.

Every pair pings pod to pod at 20 packets/s through the rotations; the master's three
phases and the agents' reauthentications must lose none of them, leave every IKE_SA
reauthenticated after the switch, and leave no charon holding a key of a retired generation.

With OVERLAY_VICI_RESULTS=FILE set, each rotation's timings are appended to FILE as JSON
lines (bench/ reads them for BENCHMARKS.md).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import vici
from cluster import (
    Cluster,
    LocalMaster,
    loaded,
    lost_at,
    status,
    wait_applied,
    wait_for,
    wait_phase,
    wait_rotated,
    warm_up,
)
from mesh import Mesh, Node, PairStats, Pinger, ping_once

from overlay_vici.agent.render import conn_name, is_owned_conn

FAST = ["--resync", "2", "--reauth-jitter", "1"]
MASTER = ["--tick", "0.5", "--agent-timeout", "8s"]


@pytest.fixture
def mesh4(tmp_path: Path) -> Iterator[tuple[Mesh, LocalMaster, Cluster]]:
    with Mesh(4, tmp_path) as mesh, LocalMaster(mesh, MASTER) as master:
        master.start()
        cluster = Cluster(mesh, FAST, keys=LocalMaster.keys)
        for node in mesh.nodes:
            cluster.start(node)
        wait_applied(master, mesh.nodes)
        warm_up(mesh)
        yield mesh, master, cluster


def ike_sas(node: Node) -> list[dict[str, Any]]:
    """Every IKE_SA charon holds: connection, unique id, state, seconds since established."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(node.vici_socket))
        session = vici.Session(sock)
        sas = []
        for entry in session.list_sas():
            for name, sa in entry.items():
                sas.append(
                    {
                        "conn": name if isinstance(name, str) else name.decode(),
                        "id": sa["uniqueid"].decode(),
                        "state": sa["state"].decode(),
                        "established": int(sa["established"]) if "established" in sa else None,
                    }
                )
        return sas


def assert_reauthenticated_after(node: Node, since: float, peers: Sequence[Node]) -> None:
    """Every IKE_SA of the node was established after `since`, and one is up per peer."""
    now = time.time()
    sas = [sa for sa in ike_sas(node) if is_owned_conn(sa["conn"])]
    old = [
        sa for sa in sas if sa["established"] is not None and now - sa["established"] < since - 1
    ]
    assert not old, f"{node.name}: IKE_SAs from before the switch at {since}: {old}"
    up = {sa["conn"] for sa in sas if sa["state"] == "ESTABLISHED"}
    assert up >= {conn_name(p.name) for p in peers if p is not node}, (node.name, sas)


def assert_only_generation(node: Node, generation: int) -> None:
    _, keys = loaded(node)
    assert keys and all(key.endswith(f"-g{generation}") for key in keys), (node.name, keys)
    assert status(node)["generations"] == {str(generation): "sent"}


def record(result: dict[str, Any]) -> None:
    path = os.environ.get("OVERLAY_VICI_RESULTS")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps(result) + "\n")


def xfrm_drops(nodes: Sequence[Node]) -> dict[str, int]:
    """The kernels' IPsec error counters summed over the nodes (/proc/net/xfrm_stat), to tell
    where a lost packet went: XfrmInNoStates counts ESP that arrived for an SA not (yet or
    any more) installed."""
    totals: dict[str, int] = {}
    for node in nodes:
        for line in node.run(["cat", "/proc/net/xfrm_stat"]).stdout.splitlines():
            name, value = line.split()
            totals[name] = totals.get(name, 0) + int(value)
    return totals


def record_lost_at(pinger: Pinger, history: dict[str, float]) -> list[tuple[str, float, str]]:
    return [(pair, when, phase_at(history, when)) for pair, when in lost_at(pinger)]


def phase_at(history: dict[str, float], when: float) -> str:
    """Which phase of the rotation a moment falls in."""
    marks = sorted((t, phase) for phase, t in history.items() if phase != "rotation")
    current = "before stage"
    for t, phase in marks:
        if when >= t:
            current = phase
    return current


def lost(stats: dict[tuple[str, str], PairStats]) -> int:
    return sum(s.lost for s in stats.values())


def assert_no_loss(stats: dict[tuple[str, str], PairStats], drops: dict[str, int]) -> None:
    """Not one probe lost; the kernels' IPsec drop counters say where any went."""
    losses = {f"{a}->{b}": s.lost for (a, b), s in stats.items() if s.lost}
    assert not losses, (losses, drops)


def test_three_rotations_lose_no_packet(mesh4: tuple[Mesh, LocalMaster, Cluster]) -> None:
    mesh, master, _ = mesh4
    mesh.install_ipip_counters()
    losses = []
    for rotation in (1, 2, 3):
        drops = xfrm_drops(mesh.nodes)
        pinger = Pinger(mesh.nodes, mesh.workdir / f"ping-{rotation}")
        pinger.start()
        time.sleep(0.5)
        requested = time.time()
        master.rotate()
        doc = wait_rotated(master, rotation)
        done = time.time()
        time.sleep(0.5)
        stats = pinger.stop()
        after = xfrm_drops(mesh.nodes)
        drops = {k: after[k] - drops.get(k, 0) for k in after if after[k] != drops.get(k, 0)}
        history = doc["history"][-1]
        active = master.keyring().sent
        for node in mesh.nodes:
            assert_reauthenticated_after(node, history["switch"], mesh.nodes)
            assert_only_generation(node, active)
        losses.append(lost(stats))
        record(
            {
                "test": "three_rotations",
                "rotation": rotation,
                "nodes": len(mesh.nodes),
                "requested": requested,
                "done_seen": done,
                **{k: v for k, v in history.items() if k != "rotation"},
                "pings_sent": sum(s.sent for s in stats.values()),
                "pings_lost": lost(stats),
                "longest_outage": max(s.longest_outage for s in stats.values()),
                "lost_at": record_lost_at(pinger, history),
                "xfrm_errors": drops,
            }
        )
        assert all(s.sent > 0 for s in stats.values()), stats
        assert_no_loss(stats, drops)
        outside = [x for x in record_lost_at(pinger, history) if x[2] != "switch"]
        assert not outside, f"rotation {rotation} lost probes outside the switch: {outside}"
    counters = mesh.read_counters()
    print(f"probes lost per rotation: {losses}")
    assert all(c.plain_ipip == 0 for c in counters.values()), counters
    assert master.state_doc()["rotation"] == 3 and master.keyring().sent == 4


def test_rotation_while_an_agent_is_down(mesh4: tuple[Mesh, LocalMaster, Cluster]) -> None:
    """n1's agent dies (its charon lives on): the master skips it; it catches up on return."""
    mesh, master, cluster = mesh4
    down = mesh.nodes[0]
    others = mesh.nodes[1:]
    drops = xfrm_drops(mesh.nodes)
    pinger = mesh.pinger()
    pinger.start()
    cluster.agents[down.name].send_signal(signal.SIGKILL)
    cluster.agents[down.name].wait()
    wait_for(
        "the master to report n1's agent expired",
        lambda: master.events("agent expired, not waiting for it"),
        timeout=30,
    )
    master.rotate()
    doc = wait_rotated(master, 1)
    active = master.keyring().sent
    for node in others:
        assert_only_generation(node, active)
    assert master.events("rotation phase switch")[-1]["skipped"] == [down.name]
    # The late agent returns and catches up: new keys only, every IKE_SA reauthenticated.
    cluster.start_agent(down)
    wait_for(
        "n1 to catch up",
        lambda: (
            (s := status(down) or {}).get("generations") == {str(active): "sent"}
            and s.get("reauthenticated")
            and s.get("peers_up") == 3
        ),
        timeout=60,
    )
    assert_only_generation(down, active)
    for node in mesh.nodes:
        assert_reauthenticated_after(node, doc["history"][-1]["switch"], mesh.nodes)
    time.sleep(2)
    stats = pinger.stop()
    record(
        {
            "test": "agent_down",
            "pings_lost_between_live": sum(
                s.lost for pair, s in stats.items() if down.name not in pair
            ),
            "pings_lost_with_down": sum(s.lost for pair, s in stats.items() if down.name in pair),
            "lost_at": record_lost_at(pinger, doc["history"][-1]),
        }
    )
    assert all(s.sent > 0 for s in stats.values())
    after = xfrm_drops(mesh.nodes)
    assert_no_loss(stats, {k: v - drops.get(k, 0) for k, v in after.items()})


def test_node_join_and_leave_during_a_rotation(mesh4: tuple[Mesh, LocalMaster, Cluster]) -> None:
    mesh, master, cluster = mesh4
    stable = mesh.nodes[:3]
    leaving = mesh.nodes[3]
    drops = xfrm_drops(stable)
    pinger = mesh.pinger()
    pinger.pairs = [(a, b) for a in stable for b in stable if a is not b]
    pinger.start()
    master.rotate()
    wait_phase(master, "stage")
    joining = mesh.add_node()
    master.write_nodes()
    cluster.start(joining)
    wait_phase(master, "switch")
    mesh.remove_node(leaving)
    master.write_nodes()
    wait_rotated(master, 1)
    keyring = master.keyring()
    assert [p.name for p in keyring.peers] == ["n1", "n2", "n3", "n5"]
    wait_applied(master, mesh.nodes)
    for node in mesh.nodes:
        assert_only_generation(node, keyring.sent)
        conns, _ = loaded(node)
        assert conn_name(leaving.name) not in conns
    for node in stable:
        assert ping_once(node, joining, count=3, timeout=10).received == 3
        assert ping_once(joining, node, count=3, timeout=10).received == 3
    stats = pinger.stop()
    history = master.state_doc()["history"][-1]
    record(
        {
            "test": "join_and_leave",
            "pings_lost": lost(stats),
            "lost_at": record_lost_at(pinger, history),
        }
    )
    assert all(s.sent > 0 for s in stats.values())
    after = xfrm_drops(stable)
    assert_no_loss(stats, {k: v - drops.get(k, 0) for k, v in after.items()})
