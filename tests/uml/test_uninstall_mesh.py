"""`kubectl delete -f` end to end: 4 nodes with real charons, agents and guards, every pair
pinging at 20 packets/s, and each node's report-lease watching the agent DaemonSet on the
project's fake API server (real HTTP, in the guest's root namespace).

The test deletes the DaemonSet through the official client as kubectl does, then plays
kubelet: a second later (the garbage collector's and kubelet's delay), every pod's agent and
charon get SIGTERM, node after node. Measured: how far apart the nodes switched off, the
probes lost per pair (the goal: at most one second's worth, 20), and that nothing of ours is
left in `ip xfrm` or netfilter once the pods are gone.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import AGENT, Cluster, mode_changes, sa_blocks, status_path, wait_for
from kubefake import FakeKube
from kubernetes.client import AppsV1Api
from mesh import Mesh, Node, shortfalls

from overlay_vici.core.contract import lease_name
from overlay_vici.master.kube import api_client

NS, DS = "overlay-vici", "overlay-vici-agent"
FAST = ["--resync", "2", "--reauth-jitter", "1"]
ONE_SECOND = 20  # probes per pair and second
KUBELET_DELAY = 1.0  # from the DaemonSet's deletion to the pods' SIGTERM


def notice(node: Node) -> Path:
    return node.dir / "run" / "removed.json"


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    with FakeKube() as fake:
        fake.apply("daemonsets", {"metadata": {"name": DS}, "spec": {}}, NS)
        yield fake


def report_lease(node: Node, kube: FakeKube) -> subprocess.Popen[bytes]:
    """The pod's report-lease container; in the root namespace, where the API server is."""
    command = [
        AGENT, "report-lease", "--node", node.name, "--status", str(status_path(node)),
        "--namespace", NS, "--server", kube.url,
        "--daemonset", DS, "--removal-notice", str(notice(node)),
    ]  # fmt: skip
    with (node.dir / "report-lease.log").open("wb") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def test_kubectl_delete_switches_every_node_off_together(tmp_path: Path, kube: FakeKube) -> None:
    reporters: list[subprocess.Popen[bytes]] = []
    with Mesh(4, tmp_path) as mesh:
        cluster = Cluster(mesh, FAST, node_args=lambda n: ["--removal-notice", str(notice(n))])
        cluster.up()  # encryption on
        try:
            reporters = [report_lease(node, kube) for node in mesh.nodes]
            for node in mesh.nodes:
                wait_for(
                    f"{node.name}'s SAs and guard",
                    lambda n=node: len(sa_blocks(n)) == 3 and n.guarded(),
                    timeout=60,
                )
                wait_for(
                    f"{node.name}'s report-lease",
                    lambda n=node: kube.get("leases", lease_name(n.name), NS),
                    timeout=30,
                )
            mesh.install_ipip_counters()
            pinger = mesh.pinger()
            pinger.start()
            time.sleep(1.5)
            deleted = time.time()
            AppsV1Api(api_client(server=kube.url)).delete_namespaced_daemon_set(DS, NS)
            time.sleep(KUBELET_DELAY)
            for node in mesh.nodes:  # kubelet stops each pod: all its containers get SIGTERM
                cluster.agents[node.name].send_signal(signal.SIGTERM)
                node.stop_charon(signal.SIGTERM)
                time.sleep(0.2)
            time.sleep(3.0)
            stats = pinger.stop()
            left = {node.name: node.xfrm_left() for node in mesh.nodes}
            guarded = [node.name for node in mesh.nodes if node.guarded()]
            off = {node.name: mode_changes(node, "off") for node in mesh.nodes}
            names = {node.name for node in mesh.nodes}
        finally:
            for reporter in reporters:
                reporter.terminate()
                reporter.wait(10)
    lost = {f"{a}->{b}": s.lost for (a, b), s in stats.items()}
    acted = {name: times[-1] - deleted for name, times in off.items() if times}
    print(f"kubectl delete: switched off after {acted} s; lost per pair {lost}")
    assert set(acted) == names, off
    # Every node switched off on the deletion, within a second of each other (measured:
    # 0.17-0.35 s after it, before the pods were stopped; 0.17 s apart).
    assert min(acted.values()) >= 0 and max(acted.values()) - min(acted.values()) < 1.0, acted
    assert not (short := shortfalls(stats, max_lost=ONE_SECOND)), short
    assert left == {name: [] for name in names}, left
    assert guarded == []
