"""The agent against real charon daemons and a real kernel with ESP and IPIP (UML guest).

Each test builds a Calico-like mesh, runs a real charon and a real agent process per node,
publishes keyrings the way kubelet updates a mounted Secret, and checks the wire.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cluster import Cluster, agent_events, loaded, sa_blocks, status, wait_for, warm_up
from mesh import Mesh, Node, ping_once, shortfalls

from overlay_vici.agent.render import conn_name, secret_id
from overlay_vici.core import keyring as kr
from overlay_vici.core.contract import KEYRING_FILE
from overlay_vici.core.files import publish_secret

FAST = ["--resync", "2", "--reauth-jitter", "1"]


@pytest.fixture
def cluster3(tmp_path: Path) -> Iterator[Cluster]:
    with Mesh(3, tmp_path) as mesh:
        cluster = Cluster(mesh, FAST)
        cluster.up()
        yield cluster


def assert_ipip_only_sas(node: Node, peers: list[Node]) -> None:
    blocks = sa_blocks(node)
    for peer in peers:
        block = blocks.get(conn_name(peer.name))
        assert block, f"{node.name} has no IKE_SA with {peer.name}:\n{blocks}"
        assert "ESTABLISHED" in block
        assert re.search(r"ipip: #\d+, reqid \d+, INSTALLED, TRANSPORT, ESP:AES_GCM_16-128", block)
        # Both ends may initiate at once and hold two IKE_SAs for a while: check every child.
        selectors = re.findall(r"^\s+(local|remote)\s+(\S+)$", block, re.M)
        expected = {("local", f"{node.ip}/32[ipencap]"), ("remote", f"{peer.ip}/32[ipencap]")}
        assert selectors and set(selectors) == expected, block


@pytest.mark.parametrize("nodes", [3, 6])
def test_every_pair_encrypted_and_only_ipip(tmp_path: Path, nodes: int) -> None:
    """Every pair: IPIP-only transport CHILD_SAs, no plaintext IPIP, underlay untouched."""
    with Mesh(nodes, tmp_path) as mesh:
        Cluster(mesh, FAST).up()
        warm_up(mesh)
        for node in mesh.nodes:
            assert_ipip_only_sas(node, [p for p in mesh.nodes if p is not node])
        stats, kinds, counters = mesh.observe_traffic(3)
        # Node-to-node traffic that is not IPIP must stay out of IPsec: no ESP for it.
        underlay = ping_once(mesh.nodes[0], mesh.nodes[1], count=3, underlay=True)
        after = mesh.read_counters()
        policies = mesh.nodes[0].run(["ip", "xfrm", "policy"]).stdout
    assert not (short := shortfalls(stats)), short
    assert all(c.plain_ipip == 0 for c in counters.values()), counters
    assert all(c.esp > 0 for c in counters.values()), counters
    assert kinds["esp"] > 0 and kinds["ipip"] == 0, kinds
    assert underlay.received == 3
    assert after == counters, "the underlay ping was carried in ESP"
    selectors = re.findall(r"^src (\S+) dst (\S+)(.*)$", policies, re.M)
    ours = [rest.strip() for src, dst, rest in selectors if dst.startswith("10.99.")]
    assert ours and all(rest == "proto ipencap" for rest in ours), policies


def test_join_loads_one_connection_and_leave_unloads_it(cluster3: Cluster) -> None:
    mesh = cluster3.mesh
    old = list(mesh.nodes)
    before = {node.name: loaded(node) for node in old}
    newcomer = mesh.add_node()
    keyring = dataclasses.replace(cluster3.keyring, serial=2, peers=tuple(cluster3.peers()))
    cluster3.publish(keyring)
    cluster3.start(newcomer)
    cluster3.wait_applied(2)
    for node in old:
        conns, keys = loaded(node)
        assert conns == before[node.name][0] | {conn_name(newcomer.name)}
        assert keys == before[node.name][1] | {secret_id(newcomer.name, keyring.sent)}
        # One key and one connection, then brought up in the same pass: every old node has
        # the lower IP (initiations go through the upkeep, sa_plan.INITIATE_BATCH a pass).
        reconciled = agent_events(node, "reconciled")[-1]
        assert reconciled["commands"] == 2
        assert any(e["ts"] >= reconciled["ts"] for e in agent_events(node, "initiating"))
    wait_for("n1 -> newcomer pod ping", lambda: ping_once(old[0], newcomer, timeout=3).received)
    assert conn_name(newcomer.name) in sa_blocks(old[0])

    leaving = dataclasses.replace(keyring, serial=3, peers=tuple(cluster3.peers(old)))
    cluster3.publish(leaving, old)
    cluster3.wait_applied(3, old)
    for node in old:
        assert loaded(node) == before[node.name]
        assert conn_name(newcomer.name) not in sa_blocks(node)


def test_child_sa_rekeying_loses_no_ping(tmp_path: Path) -> None:
    with Mesh(3, tmp_path) as mesh:
        Cluster(mesh, [*FAST, "--child-rekey-time", "10s"]).up()
        warm_up(mesh)
        spis = {node.name: child_spis(node) for node in mesh.nodes}
        pinger = mesh.pinger()
        pinger.start()
        time.sleep(24)  # lifetime = 110% of rekey_time, so rekeying is due at 9-10 s
        stats = pinger.stop()
        rekeyed = {node.name: child_spis(node) for node in mesh.nodes}
    assert all(not spis[name] & rekeyed[name] for name in spis), (spis, rekeyed)
    # 24 s at 20/s is 480 probes; the one-CPU guest's ping sends about 17/s.
    assert not (short := shortfalls(stats, min_sent=300)), short


def child_spis(node: Node) -> set[str]:
    return set(re.findall(r"SPIs: ([0-9a-f]+_i)", "".join(sa_blocks(node).values())))


def ike_sa_ids(node: Node) -> set[str]:
    return set(re.findall(r"^\S+: #(\d+),", "".join(sa_blocks(node).values()), re.M))


def test_a_peers_rekey_changes_the_sa_token_the_upkeep_trusts(cluster3: Cluster) -> None:
    """At rest the agent lists its IKE_SAs again only when `stats` or an SA event says they
    changed (upkeep.SaUpkeep._list). An IKE_SA rekey keeps every count: the event must tell,
    and a quiet mesh must not."""
    import threading

    from overlay_vici.agent.charon import EventWatcher

    node, peer = cluster3.mesh.nodes[0], cluster3.mesh.nodes[1]
    watcher = EventWatcher(f"unix://{node.vici_socket}", poll=0.1)
    stop = threading.Event()
    thread = watcher.start(stop)
    try:
        wait_for("subscribed", lambda: watcher.sa_token() is not None)

        def quiet_for_three_seconds() -> tuple[int, int] | None:
            token = watcher.sa_token()
            time.sleep(3)
            return token if token == watcher.sa_token() else None

        quiet = wait_for("the mesh to settle (no SA event for 3 s)", quiet_for_three_seconds)
        count = len(sa_blocks(node))
        peer.swanctl("--rekey", "--ike", conn_name(node.name))
        wait_for("the rekey's event", lambda: watcher.sa_token() != quiet, timeout=10)
        assert len(sa_blocks(node)) == count
    finally:
        stop.set()
        thread.join(timeout=10)


def test_generation_switch_reauthenticates_without_loss(cluster3: Cluster) -> None:
    """stage -> switch -> retire with traffic flowing: every IKE_SA is replaced, no ping lost."""
    mesh = cluster3.mesh
    warm_up(mesh)
    old_ids = {node.name: ike_sa_ids(node) for node in mesh.nodes}
    first = cluster3.keyring
    second = kr.Generation(first.sent + 1, kr.new_generation_key())
    pinger = mesh.pinger()
    pinger.start()
    stage = dataclasses.replace(first, serial=2, generations=(*first.generations, second))
    cluster3.publish(stage)
    cluster3.wait_applied(2)
    switch = dataclasses.replace(stage, serial=3, sent=second.id)
    cluster3.publish(switch)
    cluster3.wait_applied(3)
    for node in mesh.nodes:
        wait_for(
            f"{node.name} to reauthenticate every IKE_SA",
            lambda n=node: (
                (status(n) or {}).get("stale_ike_sas") == 0 and not ike_sa_ids(n) & old_ids[n.name]
            ),
            timeout=60,
        )
    retire = dataclasses.replace(switch, serial=4, generations=(second,))
    cluster3.publish(retire)
    cluster3.wait_applied(4)
    time.sleep(3)
    stats = pinger.stop()
    for node in mesh.nodes:
        _, keys = loaded(node)
        assert all(key.endswith(f"-g{second.id}") for key in keys), keys
        assert status(node)["generations"] == {str(second.id): "sent"}
        assert len(sa_blocks(node)) == 2, "one IKE_SA per peer after reauthentication"
    # The agent's make-before-break (sa_plan.plan_sas) loses nothing.
    assert not (short := shortfalls(stats, min_sent=100)), short


def _edit(good: kr.Keyring, **changes: object) -> str:
    return kr.dumps(dataclasses.replace(good, **changes))  # type: ignore[arg-type]


def _short_key(good: kr.Keyring) -> str:
    return _edit(good, generations=(kr.Generation(good.sent, b"short"),))


def _duplicate(good: kr.Keyring, field: str) -> str:
    first = good.peers[0]
    twin = dataclasses.replace(good.peers[1], **{field: getattr(first, field)})
    return _edit(good, peers=(first, twin, *good.peers[2:]))


# Each defect the keyring parser must refuse, as the bytes kubelet would hand the agent.
BAD_KEYRINGS: dict[str, Callable[[kr.Keyring], str | bytes]] = {
    "garbage": lambda good: b"\x00\xffnot json at all",
    "truncated": lambda good: kr.dumps(good)[: len(kr.dumps(good)) // 2],
    "empty": lambda good: b"",
    "ten megabytes": lambda good: b"{" + b" " * (10 * 1024 * 1024),
    "bad base64": lambda good: re.sub(r'"key": "[^"]+"', '"key": "!!!"', kr.dumps(good), count=1),
    "unknown version": lambda good: kr.dumps(good).replace('"version": 1', '"version": 99'),
    "short key": _short_key,
    "duplicate name": lambda good: _duplicate(good, "name"),
    "duplicate IP": lambda good: _duplicate(good, "ip"),
    "invalid IP": lambda good: kr.dumps(good).replace(good.peers[1].ip, "10.99.0.300"),
}


def fresh_error(node: Node, since: float) -> dict | None:
    report = status(node) or {}
    return report if report.get("updated", 0) > since and report.get("last_error") else None


def test_bad_keyrings_keep_loaded_state(cluster3: Cluster) -> None:
    mesh = cluster3.mesh
    warm_up(mesh)
    node = mesh.nodes[0]
    before = loaded(node)
    pinger = mesh.pinger()
    pinger.start()
    for kind, make in BAD_KEYRINGS.items():
        published = time.time()
        bad = make(cluster3.keyring)
        text = bad.decode("latin-1") if isinstance(bad, bytes) else bad
        publish_secret(node.dir / "keys", {KEYRING_FILE: text})
        report = wait_for(
            f"agent to reject the {kind} keyring",
            lambda t=published: fresh_error(node, t),
            timeout=20,
        )
        error = report["last_error"]
        assert error.count(". ") == 0 and "keeping keyring serial 1" in error, error
        assert loaded(node) == before
        assert status(node)["keyring_serial"] == 1
    stats = pinger.stop()
    assert not (short := shortfalls(stats, min_sent=0)), short


def df_ping(src: Node, dst: Node, packet: int) -> int:
    """Replies to three pod-to-pod pings of `packet` bytes (IP) with DF set."""
    result = src.run(
        [
            "ping",
            "-n",
            "-q",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "2",
            "-M",
            "do",
            "-s",
            str(packet - 28),
            "-I",
            src.pod_ip,
            dst.pod_ip,
        ],
        check=False,
    )
    match = re.search(r"(\d+) received", result.stdout)
    return int(match[1]) if match else 0


def test_overlay_vici_mtu_is_the_largest_that_fits(tmp_path: Path) -> None:
    """`overlay-vici mtu 1500` (1446) crosses a 1500-byte wire encrypted; 1 byte more does not."""
    from overlay_vici.agent.mtu import ipip_mtu

    with Mesh(2, tmp_path) as mesh:
        Cluster(mesh, FAST).up()
        warm_up(mesh)
        src, dst = mesh.nodes
        for node in mesh.nodes:
            node.run(["ip", "link", "set", "tunl0", "mtu", "1500"])
        safe = ipip_mtu(1500)
        fits, too_big = df_ping(src, dst, safe), df_ping(src, dst, safe + 1)
        assert_ipip_only_sas(src, [dst])
    assert safe == 1446
    assert fits == 3
    assert too_big == 0
