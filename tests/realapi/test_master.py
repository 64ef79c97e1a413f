"""The master and report-lease as real processes (the `overlay-vici` CLI) against a real API
server, each authenticated as its own ServiceAccount with a TokenRequest token, so that RBAC
judges every call they make. The test stands in for kubelet and the agents: it creates the
Nodes, and writes the agents' status reports that report-lease copies into Leases."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from control_plane import (
    MANIFEST,
    NS,
    OVERLAY_VICI,
    TEST_NODE_LABEL,
    ControlPlane,
    free_port,
    until,
)

LEASE_SECONDS = 5
SECRET = "overlay-vici-keys"


@contextmanager
def process(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A CLI process, its output in `log`; stopped (SIGTERM) when the block ends."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def master(plane: ControlPlane, identity: str, metrics_port: int = 0) -> list[str]:
    return [
        str(OVERLAY_VICI),
        "master",
        "--kubeconfig",
        str(plane.kubeconfig_for("overlay-vici-master")),
        "--namespace",
        NS,
        "--identity",
        identity,
        "--lease-duration",
        str(LEASE_SECONDS),
        "--tick",
        "1s",
        "--metrics-port",
        str(metrics_port),
    ]


def node(plane: ControlPlane, name: str, ip: str) -> None:
    """A Node as kubelet registers it: the InternalIP in its status, set at create."""
    body = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {TEST_NODE_LABEL: "true"}},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
    }
    plane.kubectl("create", "-f", "-", stdin=json.dumps(body))


def move(plane: ControlPlane, name: str, ip: str) -> None:
    """An IP change, as kubelet makes it: through the status subresource (an update of the
    Node itself keeps the old status)."""
    patch = {"status": {"addresses": [{"type": "InternalIP", "address": ip}]}}
    plane.kubectl(
        "patch", "node", name, "--subresource=status", "--type=merge", "-p", json.dumps(patch)
    )


def secret_doc(plane: ControlPlane, key: str) -> dict[str, Any] | None:
    secret = plane.get("-n", NS, "secret", SECRET)
    if secret is None:
        return None
    return json.loads(base64.b64decode(secret["data"][key]))


def peers(plane: ControlPlane) -> dict[str, str] | None:
    keyring = secret_doc(plane, "keyring.json")
    return {p["name"]: p["ip"] for p in keyring["peers"]} if keyring else None


def leader(plane: ControlPlane) -> str | None:
    lease = plane.get("-n", NS, "lease", "overlay-vici-master")
    return lease["spec"].get("holderIdentity") if lease else None


def test_the_master_publishes_the_secret_and_follows_node_changes(
    cluster: ControlPlane, tmp_path: Path
) -> None:
    node(cluster, "n1", "10.0.0.1")
    node(cluster, "n2", "10.0.0.2")
    started = time.monotonic()
    with process(master(cluster, "a"), tmp_path / "master.log") as proc:
        until("the first keyring", lambda: peers(cluster) == {"n1": "10.0.0.1", "n2": "10.0.0.2"})
        print(f"first keyring published {time.monotonic() - started:.2f} s after start")
        first = secret_doc(cluster, "keyring.json")
        assert first is not None
        changes = [
            (lambda: node(cluster, "n3", "10.0.0.3"), {"n1", "n2", "n3"}),
            (lambda: move(cluster, "n1", "10.0.0.11"), {"n1", "n2", "n3"}),
            (lambda: cluster.kubectl("delete", "node", "n2"), {"n1", "n3"}),
        ]
        for serial, (change, names) in enumerate(changes, start=first["serial"] + 1):
            changed = time.monotonic()
            change()
            doc = until(
                f"keyring serial {serial}",
                lambda s=serial: (
                    (d := secret_doc(cluster, "keyring.json")) and d["serial"] == s and d
                ),
            )
            print(f"serial {serial} published {time.monotonic() - changed:.2f} s after the change")
            assert {p["name"] for p in doc["peers"]} == names
            assert doc["generations"] == first["generations"]  # the same keys
        assert peers(cluster) == {"n1": "10.0.0.11", "n3": "10.0.0.3"}
        assert proc.poll() is None, (tmp_path / "master.log").read_text()
    log = (tmp_path / "master.log").read_text()
    assert "403" not in log and "Forbidden" not in log, log


def test_the_master_relists_after_its_watch_breaks_and_comes_back_410(
    cluster: ControlPlane, tmp_path: Path
) -> None:
    """A restarted API server breaks the watch, and its new watch cache holds nothing older
    than itself, while the leader Lease's renewals moved etcd's revision on: resuming from
    the old resourceVersion is answered 410 Gone, and the master lists again."""
    node(cluster, "n1", "10.0.0.1")
    log = tmp_path / "master.log"
    with process(master(cluster, "a"), log) as proc:
        until("the first keyring", lambda: peers(cluster))
        time.sleep(LEASE_SECONDS)  # a few Lease renewals after the master's list
        cluster.restart_apiserver()
        node(cluster, "n2", "10.0.0.2")
        until("n2 published", lambda: "n2" in (peers(cluster) or {}), timeout=60)
        assert proc.poll() is None, log.read_text()
    assert "node watch expired, listing again" in log.read_text(), log.read_text()


def conflicts(port: int) -> float:
    """The master's count of 409s on its Secret, from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if 'api_conflicts_total{resource="secret"}' in line:
                return float(line.split()[-1])
    return 0.0


def test_a_concurrent_writer_gets_409s_to_the_master_and_is_never_overwritten(
    cluster: ControlPlane, tmp_path: Path
) -> None:
    """Another writer annotates the Secret as fast as it can while Nodes join: some of the
    master's replaces meet a 409, it reads again, and what the other wrote survives."""
    from kubernetes import client, config

    core = client.CoreV1Api(config.new_client_from_config(str(cluster.admin)))
    node(cluster, "n1", "10.0.0.1")
    port = free_port()
    stop, written = threading.Event(), [0]

    def other_writer() -> None:
        while not stop.is_set():
            written[0] += 1
            patch = {"metadata": {"annotations": {"test/other-writer": str(written[0])}}}
            core.patch_namespaced_secret(SECRET, NS, patch)

    with process(master(cluster, "a", port), tmp_path / "master.log") as proc:
        until("the first keyring", lambda: peers(cluster))
        writer = threading.Thread(target=other_writer)
        writer.start()
        try:
            for i in range(2, 12):
                node(cluster, f"n{i}", f"10.0.0.{i}")
                until(f"n{i} published", lambda i=i: f"n{i}" in (peers(cluster) or {}))
                if conflicts(port) > 0:
                    break
        finally:
            stop.set()
            writer.join(10)
        assert conflicts(port) > 0, "no 409 in 10 joins: the race was never hit"
        time.sleep(2)
        secret = cluster.get("-n", NS, "secret", SECRET)
        assert secret is not None
        assert secret["metadata"]["annotations"]["test/other-writer"] == str(written[0])
        assert len(peers(cluster) or {}) == i
        assert proc.poll() is None


def test_two_replicas_elect_one_leader_and_the_other_takes_over_when_it_dies(
    cluster: ControlPlane, tmp_path: Path
) -> None:
    node(cluster, "n1", "10.0.0.1")
    with (
        process(master(cluster, "a"), tmp_path / "a.log") as a,
        process(master(cluster, "b"), tmp_path / "b.log") as b,
    ):
        first = until("a leader", lambda: leader(cluster))
        until("the keyring", lambda: peers(cluster))
        time.sleep(2 * LEASE_SECONDS)  # the follower must not take over a live leader
        assert leader(cluster) == first
        survivor = "b" if first == "a" else "a"
        killed = time.monotonic()
        ({"a": a, "b": b}[first]).send_signal(signal.SIGKILL)  # a crash: no release
        until(f"{survivor} to lead", lambda: leader(cluster) == survivor, timeout=4 * LEASE_SECONDS)
        failover = time.monotonic() - killed
        print(f"leader failover after SIGKILL: {failover:.2f} s (--lease-duration {LEASE_SECONDS})")
        assert failover < LEASE_SECONDS + 3
        # The new leader writes: a node change is published.
        node(cluster, "n2", "10.0.0.2")
        until("n2 published by the new leader", lambda: "n2" in (peers(cluster) or {}))


def agent_status(keyring: dict[str, Any], node_name: str) -> dict[str, Any]:
    """What an agent that applied `keyring` reports (its status file)."""
    return {
        "node": node_name,
        "updated": time.time(),
        "keyring_serial": keyring["serial"],
        "sent_generation": keyring["sent"],
        "generations": {
            str(g["id"]): "sent" if g["id"] == keyring["sent"] else "accepted"
            for g in keyring["generations"]
        },
        "reauthenticated": True,
        "stale_ike_sas": 0,
        "stale_peers": [],
        "peers_up": len(keyring["peers"]) - 1,
        "peers_expected": len(keyring["peers"]) - 1,
        "last_error": None,
    }


def reporter(plane: ControlPlane, node_name: str, status: Path, notice: Path) -> list[str]:
    return [
        str(OVERLAY_VICI),
        "report-lease",
        "--node",
        node_name,
        "--status",
        str(status),
        "--namespace",
        NS,
        "--server",
        plane.server,
        "--token-file",
        str(plane.token("overlay-vici-agent")),
        "--ca-file",
        str(plane.pki.ca),
        "--heartbeat",
        "5s",
        "--daemonset",
        "overlay-vici-agent",
        "--removal-notice",
        str(notice),
    ]


def acked_serial(plane: ControlPlane, node_name: str) -> int | None:
    lease = plane.get("-n", NS, "lease", f"overlay-vici-agent-{node_name}")
    if lease is None:
        return None
    return json.loads(lease["metadata"]["annotations"]["overlay-vici.io/status"])["keyring_serial"]


def test_report_lease_acknowledges_and_the_master_rotates_on_it_with_events(
    cluster: ControlPlane, tmp_path: Path
) -> None:
    node(cluster, "n1", "10.0.0.1")
    status, notice = tmp_path / "status.json", tmp_path / "removed.json"
    with (
        process(master(cluster, "a"), tmp_path / "master.log"),
        process(reporter(cluster, "n1", status, notice), tmp_path / "lease.log"),
    ):
        keyring = until("the keyring", lambda: secret_doc(cluster, "keyring.json"))
        status.write_text(json.dumps(agent_status(keyring, "n1")))
        until("n1's ack", lambda: acked_serial(cluster, "n1") == keyring["serial"])
        subprocess.run(
            [str(OVERLAY_VICI), "rotate", "--kubeconfig", str(cluster.admin), "--namespace", NS],
            check=True,
            timeout=60,
        )
        # Each phase waits for n1's ack of the keyring that began the one before. Which
        # keyring is which phase: generations and the sent one (old: the first key's id).
        old = keyring["sent"]
        phases = {
            "stage": lambda d: len(d["generations"]) == 2 and d["sent"] == old,
            "switch": lambda d: len(d["generations"]) == 2 and d["sent"] != old,
            "retire": lambda d: [g["id"] for g in d["generations"]] == [d["sent"]] != [old],
        }
        to_lease, to_next = [], []
        acked = time.monotonic()
        for phase, reached in phases.items():
            keyring = until(
                f"phase {phase}",
                lambda r=reached: (d := secret_doc(cluster, "keyring.json")) and r(d) and d,
            )
            # The test is n1's agent: it applies the keyring as soon as it sees it.
            published = time.monotonic()
            if phase != "stage":
                to_next.append(published - acked)
            status.write_text(json.dumps(agent_status(keyring, "n1")))
            until(
                f"n1's ack of {keyring['serial']}",
                lambda s=keyring["serial"]: acked_serial(cluster, "n1") == s,
            )
            acked = time.monotonic()
            to_lease.append(acked - published)
        print("agent report to Lease ack: " + ", ".join(f"{d:.2f} s" for d in to_lease))
        print("Lease ack to the next phase's Secret: " + ", ".join(f"{d:.2f} s" for d in to_next))
        until(
            "the rotation's end",
            lambda: (
                (d := secret_doc(cluster, "master.json"))
                and d["phase"] == "idle"
                and d["rotation"] == 1
            ),
        )
        events = cluster.get("-n", NS, "events")
        assert events is not None
        on_secret = [e for e in events["items"] if e["involvedObject"]["name"] == SECRET]
        reasons = [e["reason"] for e in on_secret]
        assert len(reasons) >= 3, reasons
        printed = cluster.kubectl("-n", NS, "get", "events").stdout
        assert reasons[0] in printed


def test_deleting_the_daemonset_writes_the_removal_notice(
    cluster: ControlPlane, tmp_path: Path
) -> None:
    status, notice = tmp_path / "status.json", tmp_path / "removed.json"
    status.write_text(json.dumps({"node": "n1", "updated": time.time(), "keyring_serial": 1}))
    try:
        with process(reporter(cluster, "n1", status, notice), tmp_path / "lease.log") as proc:
            until("the Lease", lambda: acked_serial(cluster, "n1") == 1)
            assert not notice.exists()
            # An update of the DaemonSet is not a removal.
            cluster.kubectl(
                "-n",
                NS,
                "annotate",
                "--overwrite",
                "daemonset",
                "overlay-vici-agent",
                "test/touched=1",
            )
            time.sleep(1)
            assert not notice.exists()
            deleted = time.monotonic()
            cluster.kubectl("-n", NS, "delete", "daemonset", "overlay-vici-agent")
            until("the removal notice", notice.exists, timeout=10)
            print(f"removal notice {time.monotonic() - deleted:.2f} s after kubectl delete")
            assert json.loads(notice.read_text())["at"] > 0
            assert proc.poll() is None or proc.returncode == 0
    finally:
        cluster.kubectl(
            "apply", "--server-side", "--field-manager=overlay-vici-test", "-f", str(MANIFEST)
        )
