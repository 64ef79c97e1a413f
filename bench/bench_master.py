"""Benchmark the master at N nodes: the keyring, its size against the Secret limit, and the
cost of one rotation phase (pure core; a full step through the `kubernetes` client against
the in-process fake API server with N agent Leases; a full step in local mode).

    .venv/bin/python bench/bench_master.py --nodes 100,1000,5000 --repeat 3 [--uml FILE]
    .venv/bin/python bench/bench_master.py --node-keys --nodes 100,1000,5000 --repeat 3

--node-keys measures the keyring with every node's public key instead (issue 11): its size,
the master's step that publishes N keys, one node's PSK derivation for its N-1 pairs against
the shared-root derivation (the lower bound) in the same run, and, for comparison, what
sealing every node's N-1 PSKs to its key (the per-node bundle design) would cost the master.

--uml FILE summarises the end-to-end rotation timings that tests/uml/test_rotation_mesh.py
wrote with OVERLAY_VICI_RESULTS=FILE.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from overlay_vici.core import keyring as kr
from overlay_vici.core.contract import (
    AGENT_LABEL,
    AGENT_LABEL_VALUE,
    STATUS_ANNOTATION,
    AgentReport,
    lease_name,
)
from overlay_vici.core.files import write_json
from overlay_vici.master.master import Master
from overlay_vici.master.rotation import NodeInfo, Policy, decide, dumps_state

SECRET_LIMIT = 1024 * 1024
POLICY = Policy(interval=86400, agent_timeout=90)


def nodes(n: int) -> list[NodeInfo]:
    return [
        NodeInfo(f"node-{i}", f"10.{i // 62500}.{i // 250 % 250}.{i % 250 + 1}") for i in range(n)
    ]


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float, Any]:
    """Median and min in ms, and the last result."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), min(times), result


def reports_for(decision: Any, now: float) -> dict[str, AgentReport]:
    k = decision.keyring
    return {
        p.name: AgentReport(p.name, now, k.serial, k.sent, reauthenticated=True) for p in k.peers
    }


def status_doc(decision: Any, name: str, now: float) -> dict[str, Any]:
    k = decision.keyring
    return {
        "node": name,
        "updated": now,
        "keyring_serial": k.serial,
        "sent_generation": k.sent,
        "generations": {str(g.id): "sent" if g.id == k.sent else "accepted" for g in k.generations},
        "reauthenticated": True,
        "stale_ike_sas": 0,
        "stale_peers": [],
        "peers_up": len(k.peers) - 1,
        "peers_expected": len(k.peers) - 1,
        "last_error": None,
    }


def bench_n(n: int, repeat: int) -> dict[str, Any]:
    row: dict[str, Any] = {"N": n}
    listed = nodes(n)
    now = time.time()
    row["build_ms"] = timed(lambda: decide(None, None, listed, {}, now, POLICY), repeat)[:2]
    start = decide(None, None, listed, {}, now, POLICY)
    row["dumps_ms"] = timed(lambda: kr.dumps(start.keyring), repeat)[:2]
    text = kr.dumps(start.keyring)
    row["loads_ms"] = timed(lambda: kr.loads(text), repeat)[:2]
    stage = decide(start.keyring, start.state, listed, reports_for(start, now), now, POLICY, "r")
    two = kr.dumps(stage.keyring)
    master_json = dumps_state(stage.state)
    row["size_idle"] = len(text.encode())
    row["size_two_generations"] = len(two.encode())
    row["master_json"] = len(master_json.encode())
    secret_data = len(two.encode()) + len(master_json.encode())
    row["secret_data"] = secret_data
    row["secret_base64"] = len(base64.b64encode(two.encode())) + len(
        base64.b64encode(master_json.encode())
    )
    row["limit_share"] = secret_data / SECRET_LIMIT
    # One phase (stage -> switch), every agent acknowledged: the pure decision.
    acks = reports_for(stage, now + 1)
    row["phase_pure_ms"] = timed(
        lambda: decide(stage.keyring, stage.state, listed, acks, now + 1, POLICY, "r"), repeat
    )[:2]
    row["phase_kube_ms"], row["kube_secret_bytes"] = bench_kube(n, listed, start, repeat)
    row["phase_local_ms"] = bench_local(n, listed, repeat)
    return row


def bench_kube(n: int, listed: list[NodeInfo], start: Any, repeat: int) -> tuple[Any, int]:
    """Master.step() through the kubernetes client: leader Lease renew, read the Secret,
    list N agent Leases, decide, replace the Secret. Measured on the stage -> switch step."""
    from kubefake import FakeKube

    from overlay_vici.master.kube import KubeStore, api_client

    class Nodes:
        def __init__(self) -> None:
            self.nodes = listed

    times = []
    size = 0
    with FakeKube() as fake:
        api = api_client(server=fake.url)
        store = KubeStore(api, "bench", watcher=Nodes())  # type: ignore[arg-type]
        clock = [time.time()]
        master = Master(store, POLICY, clock=lambda: clock[0])
        for _ in range(repeat):
            fake.delete("secrets", "overlay-vici-keys", "bench")
            master.step()  # creates the keyring
            decision = master.last
            ack_all(fake, decision, clock[0])
            fake.apply("secrets", request(fake), "bench")
            master.step()  # -> stage
            ack_all(fake, master.last, clock[0])
            begin = time.perf_counter()
            master.step()  # -> switch: the measured phase step
            times.append((time.perf_counter() - begin) * 1000)
            assert master.last is not None and master.last.state.phase == "switch", master.last
            secret = fake.get("secrets", "overlay-vici-keys", "bench")
            size = len(json.dumps(secret))
    return (statistics.median(times), min(times)), size


def request(fake: Any) -> dict[str, Any]:
    secret = fake.get("secrets", "overlay-vici-keys", "bench")
    secret["metadata"].setdefault("annotations", {})["overlay-vici.io/rotate-requested"] = str(
        time.time()
    )
    return secret


def ack_all(fake: Any, decision: Any, now: float) -> None:
    for peer in decision.keyring.peers:
        doc = status_doc(decision, peer.name, now)
        fake.apply(
            "leases",
            {
                "metadata": {
                    "name": lease_name(peer.name),
                    "labels": {AGENT_LABEL: AGENT_LABEL_VALUE},
                    "annotations": {STATUS_ANNOTATION: json.dumps(doc)},
                },
                "spec": {"holderIdentity": peer.name, "leaseDurationSeconds": 90},
            },
            "bench",
        )


def bench_local(n: int, listed: list[NodeInfo], repeat: int) -> tuple[float, float]:
    """Master.step() in local mode: read N status files, decide, publish N+1 Secret copies."""
    from overlay_vici.master.local import LocalStore, node_status_path, request_rotation

    times = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as tmp:
            state = Path(tmp) / "state"
            nodes_file = Path(tmp) / "nodes.json"
            nodes_file.write_text(json.dumps([{"name": x.name, "ip": x.ip} for x in listed]))
            master = Master(LocalStore(state, nodes_file), POLICY)
            master.step()
            request_rotation(state)
            for _ in range(2):  # ack the keyring, then step: created -> stage -> switch
                now = time.time()
                for peer in master.last.keyring.peers:  # type: ignore[union-attr]
                    write_json(
                        node_status_path(state, peer.name), status_doc(master.last, peer.name, now)
                    )
                begin = time.perf_counter()
                master.step()
            times.append((time.perf_counter() - begin) * 1000)
            assert master.last is not None and master.last.state.phase == "switch"
    return statistics.median(times), min(times)


def keyed_reports(decision: Any, pubs: dict[str, bytes], now: float) -> dict[str, AgentReport]:
    return {
        name: dataclasses.replace(report, public_key=pubs[name])
        for name, report in reports_for(decision, now).items()
    }


def bench_node_keys(n: int, repeat: int) -> dict[str, Any]:
    """The keyring with node keys: size, publishing N keys, and the derivations."""
    row: dict[str, Any] = {"N": n}
    listed = nodes(n)
    now = time.time()
    private = {x.name: kr.new_node_key() for x in listed}
    pubs = {name: kr.public_bytes(key) for name, key in private.items()}
    start = decide(None, None, listed, {}, now, POLICY)
    acks = keyed_reports(start, pubs, now)
    row["publish_ms"] = timed(
        lambda: decide(start.keyring, start.state, listed, acks, now, POLICY), repeat
    )[:2]
    keyed = decide(start.keyring, start.state, listed, acks, now, POLICY)
    assert all(p.pub for p in keyed.keyring.peers)
    stage = decide(keyed.keyring, keyed.state, listed, acks, now, POLICY, "r")
    one, two = kr.dumps(keyed.keyring), kr.dumps(stage.keyring)
    row["size_idle"], row["size_two"] = len(one.encode()), len(two.encode())
    secret = len(two.encode()) + len(dumps_state(stage.state).encode())
    row["secret_data"], row["limit_share"] = secret, secret / SECRET_LIMIT
    row["loads_ms"] = timed(lambda: kr.loads(two), repeat)[:2]
    # One node's PSKs with its N-1 peers in one generation: bound vs the shared root key.
    keyring = keyed.keyring
    gen = keyring.generation(keyring.sent)
    me, others = keyring.peers[0], keyring.peers[1:]
    own = private[me.name]
    row["bound_ms"] = timed(lambda: [kr.psk_for(gen, me, p, own) for p in others], repeat)[:2]
    shared = kr.Generation(gen.id, gen.key)
    row["shared_ms"] = timed(lambda: [kr.psk_for(shared, me, p, None) for p in others], repeat)[:2]
    # The alternative: the master seals each node's N-1 PSKs to that node's public key.
    median, least, bundle = timed(lambda: seal_bundle(shared, me, others, pubs[me.name]), repeat)
    row["seal_one_ms"] = (median, least)
    row["seal_all_s"] = (median * n / 1000, least * n / 1000)
    row["sealed_bytes"] = len(bundle) * n
    return row


def seal_bundle(gen: kr.Generation, node: kr.Peer, peers: Any, pub: bytes) -> bytes:
    """The per-node bundle design: the node's N-1 PSKs (HKDF of the root key, as the master
    would derive them) in one AES-GCM box under an X25519 key agreed with the node's public
    key, the node and generation bound as associated data."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    plain = b"".join(p.name.encode() + b"\0" + kr.pair_psk(gen, node.ip, p.ip) for p in peers)
    ephemeral = kr.new_node_key()
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(pub))
    key = HKDF(hashes.SHA256(), 16, None, b"bundle").derive(shared)
    nonce = os.urandom(12)
    aad = f"{node.name}|{gen.id}".encode()
    sealed = AESGCM(key).encrypt(nonce, plain, aad)
    return kr.public_bytes(ephemeral) + nonce + sealed


def uml_summary(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r.get("test") != "three_rotations":
            continue
        rows.append(
            {
                "rotation": r["rotation"],
                "request_to_stage": r["stage"] - r["requested"],
                "stage_to_switch": r["switch"] - r["stage"],
                "switch_to_retire": r["retire"] - r["switch"],
                "retire_to_done": r["idle"] - r["retire"],
                "total": r["idle"] - r["requested"],
                "pings_sent": r["pings_sent"],
                "pings_lost": r["pings_lost"],
                "xfrm_errors": r.get("xfrm_errors"),
            }
        )
    return rows


def fmt(value: Any) -> str:
    if isinstance(value, tuple):
        return f"{value[0]:,.1f} ({value[1]:,.1f})"
    if isinstance(value, float):
        return f"{value:.1%}"
    return f"{value:,}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="100,1000,5000")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--uml", type=Path)
    parser.add_argument("--node-keys", action="store_true", help="the node keys table")
    args = parser.parse_args()
    if args.node_keys:
        node_keys_table([bench_node_keys(int(n), args.repeat) for n in args.nodes.split(",")])
        return
    rows = [bench_n(int(n), args.repeat) for n in args.nodes.split(",")]
    labels = {
        "build_ms": "build the first keyring (decide: nodes -> keyring), ms",
        "dumps_ms": "serialise it (keyring.dumps), ms",
        "loads_ms": "parse and validate it (keyring.loads), ms",
        "size_idle": "keyring.json, one generation, bytes",
        "size_two_generations": "keyring.json, two generations (stage/switch), bytes",
        "master_json": "master.json, bytes",
        "secret_data": "Secret data (both files), bytes",
        "limit_share": "share of the 1 MiB Secret limit",
        "secret_base64": "same, base64 as stored in the object, bytes",
        "kube_secret_bytes": "whole Secret object as JSON from the API, bytes",
        "phase_pure_ms": "one phase, pure decide() with N acks, ms",
        "phase_kube_ms": "one phase, Master.step() via kubernetes client + fake API, ms",
        "phase_local_ms": "one phase, Master.step() in local mode (N status files, N copies), ms",
    }
    table(rows, labels)
    if args.uml:
        print()
        print(json.dumps(uml_summary(args.uml), indent=1))


def table(rows: list[dict[str, Any]], labels: dict[str, str]) -> None:
    print("| measure | " + " | ".join(f"N={r['N']:,}" for r in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for key, label in labels.items():
        print(f"| {label} | " + " | ".join(fmt(r[key]) for r in rows) + " |")


def node_keys_table(rows: list[dict[str, Any]]) -> None:
    table(
        rows,
        {
            "size_idle": "keyring.json with every node's public key, one generation, bytes",
            "size_two": "same, two generations (stage/switch), bytes",
            "secret_data": "Secret data (keyring + master.json), bytes",
            "limit_share": "share of the 1 MiB Secret limit",
            "loads_ms": "parse and validate it (keyring.loads), ms",
            "publish_ms": "master: publish N reported keys, pure decide(), ms",
            "bound_ms": "agent: one node's N-1 PSKs, node keys (X25519 + HKDF), ms",
            "shared_ms": "agent: same, shared root key (HKDF only, the lower bound), ms",
            "seal_one_ms": "alternative: master seals one node's N-1 PSKs (HKDF + AES-GCM), ms",
            "seal_all_s": "alternative: same for all N nodes, per generation, s (one x N)",
            "sealed_bytes": "alternative: all N sealed bundles, one generation, bytes",
        },
    )


if __name__ == "__main__":
    main()
