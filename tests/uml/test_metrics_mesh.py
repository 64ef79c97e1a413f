"""Metrics, /healthz and the MTU check against real charons and real interfaces (UML guest).

Each node's agent serves /metrics on its default port (9541) inside the node's network
namespace; the tests scrape it from there. What they show: the per-peer SA gauge and the
generations follow charon; CHILD_SA and IKE_SA rekeys and IKE authentication failures are
counted from charon's own VICI events (so the log lines matched are the ones charon 5.9.8
really writes); reauthentications after a key switch are requested and completed; and
`overlay-vici mtu --check` judges a node's real tunl0 (1480 after Calico's default: too
large, names 1446; 1446: fits), which the agent also warns about at start.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from cluster import AGENT, Cluster, agent_events, ping_every_pair, status, wait_for
from mesh import Mesh, Node, ping_once

from overlay_vici.core import keyring as kr

FAST = ["--resync", "2", "--reauth-jitter", "1"]
SCRAPE = """
import json, sys, urllib.error, urllib.request
from prometheus_client.parser import text_string_to_metric_families
base = sys.argv[1]
text = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
try:
    health = urllib.request.urlopen(base + "/healthz", timeout=5)
    code, body = health.status, health.read().decode()
except urllib.error.HTTPError as exc:
    code, body = exc.code, exc.read().decode()
samples = {}
for family in text_string_to_metric_families(text):
    for s in family.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        samples[s.name + ("{" + labels + "}" if labels else "")] = s.value
print(json.dumps({"samples": samples, "health": [code, body]}))
"""


def scrape(node: Node, port: int = 9541) -> dict[str, Any]:
    """The node's agent's /metrics as {'name{labels}': value}, and its /healthz."""
    result = node.run([sys.executable, "-c", SCRAPE, f"http://127.0.0.1:{port}"], check=False)
    if result.returncode != 0:
        return {}
    return json.loads(result.stdout)


def value(node: Node, name: str) -> float:
    return scrape(node).get("samples", {}).get(name, 0.0)


def test_metrics_follow_charon_through_rekeys_and_a_key_switch(tmp_path: Path) -> None:
    with Mesh(2, tmp_path) as mesh:
        # The IKE_SA and its CHILD_SA start together, so the IKE rekey must not fall on a
        # multiple of the CHILD_SA's: charon answers an IKE rekey that meets a CHILD_SA
        # rekey with TEMPORARY_FAILURE and retries 6-15 s later, past the IKE_SA's hard
        # lifetime (over_time, a tenth of 20 s): with 10 s and 20 s it can expire
        # unrekeyed, the likely cause of "no IKE rekey counted in 60 s" in CI (stop 18), not
        # reproduced in the guest. 15 s: IKE at 13-15 s, CHILD_SA at 9-10 and 18-20 s.
        cluster = Cluster(mesh, [*FAST, "--child-rekey-time", "10s", "--ike-rekey-time", "15s"])
        first = cluster.up()
        ping_every_pair(mesh.nodes)
        n1 = mesh.nodes[0]
        view = wait_for(
            "n1's metrics to show n2 up",
            lambda: (
                (v := scrape(n1))
                and v["samples"].get('overlay_vici_peer_sa_up{peer="n2"}') == 1
                and v["samples"].get("overlay_vici_events_connected") == 1
                and v
            ),
        )
        samples = view["samples"]
        assert view["health"] == [200, "ok\n"]
        assert samples['overlay_vici_generation{generation="1",role="sent"}'] == 1
        assert samples["overlay_vici_keyring_serial"] == 1
        assert samples["overlay_vici_charon_connected"] == 1
        assert samples["overlay_vici_ike_sas"] >= 1
        assert samples["overlay_vici_reconcile_duration_seconds_count"] >= 1
        assert samples["overlay_vici_last_success_timestamp_seconds"] > time.time() - 30
        # Rekeying, counted from charon's child-rekey and ike-rekey events, at both ends.
        for node in mesh.nodes:
            for sa in ("child", "ike"):
                wait_for(
                    f"{node.name} to count a {sa} rekey",
                    lambda n=node, s=sa: value(n, f'overlay_vici_rekeys_total{{sa="{s}"}}') >= 1,
                    timeout=60,
                )
        # A key switch: the stale IKE_SAs are reauthenticated, requested and completed.
        second = kr.Generation(2, kr.new_generation_key())
        stage = dataclasses.replace(first, serial=2, generations=(*first.generations, second))
        cluster.publish(stage)
        cluster.wait_applied(2)
        cluster.publish(dataclasses.replace(stage, serial=3, sent=2))
        cluster.wait_applied(3)
        for node in mesh.nodes:
            wait_for(
                f"{node.name} to have no stale IKE_SA",
                lambda n=node: (status(n) or {}).get("stale_ike_sas") == 0,
                timeout=60,
            )

        def reauths() -> tuple[float, float]:
            views = [scrape(node)["samples"] for node in mesh.nodes]
            return (
                sum(v["overlay_vici_reauth_requests_total"] for v in views),
                sum(v["overlay_vici_reauths_completed_total"] for v in views),
            )

        requested, completed = wait_for(
            "the reauthentications to be counted complete",
            lambda: (r := reauths())[0] >= 1 and r[1] == r[0] and r,
            timeout=30,
        )
        final = {node.name: scrape(node)["samples"] for node in mesh.nodes}
    print(f"reauthentications requested {requested}, completed {completed}")
    for name, samples in final.items():
        assert samples['overlay_vici_generation{generation="2",role="sent"}'] == 1, name
        assert samples['overlay_vici_generation{generation="1",role="accepted"}'] == 1, name
        assert samples["overlay_vici_stale_ike_sas"] == 0, name
        for reason in ("mismatch", "no_key", "rejected"):
            key = f'overlay_vici_ike_auth_failures_total{{reason="{reason}"}}'
            assert samples[key] == 0, (name, reason)


def test_authentication_failures_are_counted_from_charons_log(tmp_path: Path) -> None:
    """The two ends hold different keys: the end verifying the other's AUTH counts a
    mismatch, the end whose AUTH was refused counts a rejection, as charon logs them."""
    with Mesh(2, tmp_path) as mesh:
        cluster = Cluster(mesh, FAST)
        n1, n2 = mesh.nodes
        ours = kr.create(cluster.peers())
        theirs = dataclasses.replace(ours, generations=(kr.Generation(1, kr.new_generation_key()),))
        cluster.publish(ours, [n1])
        cluster.publish(theirs, [n2])
        for node in mesh.nodes:
            cluster.start(node)
        cluster.wait_applied(1)

        def failed(node: Node, reason: str) -> bool:
            """Pod traffic from each end makes each initiate (the trap), so that each end
            both verifies a wrong AUTH and has its own refused."""
            for src, dst in ((n1, n2), (n2, n1)):
                ping_once(src, dst, count=1, timeout=1)
            name = f'overlay_vici_ike_auth_failures_total{{reason="{reason}"}}'
            return value(node, name) >= 1

        for node in mesh.nodes:
            for reason in ("mismatch", "rejected"):
                wait_for(
                    f"{node.name} to count an authentication failure ({reason})",
                    lambda n=node, r=reason: failed(n, r),
                    timeout=60,
                )
        views = {node.name: scrape(node) for node in mesh.nodes}
        logged = {node.name: agent_events(node, "IKE authentication failed") for node in mesh.nodes}
        charon_logs = {node.name: node.charon_log.read_text() for node in mesh.nodes}
    for name, view in views.items():
        other = "n2" if name == "n1" else "n1"
        assert view["samples"][f'overlay_vici_peer_sa_up{{peer="{other}"}}'] == 0
        assert view["health"] == [200, "ok\n"], "charon is connected: the agent is healthy"
        assert view["samples"]['overlay_vici_ike_auth_failures_total{reason="no_key"}'] == 0
        assert "but MAC mismatched" in charon_logs[name]
        assert "received AUTHENTICATION_FAILED notify error" in charon_logs[name]
        peers = {entry["peer"] for entry in logged[name]}
        assert peers == {f"ov-{other}"}, logged[name]


def test_mtu_check_on_a_nodes_real_tunl0(tmp_path: Path) -> None:
    with Mesh(2, tmp_path) as mesh:
        node = mesh.nodes[0]
        mtu = node.run(["cat", "/sys/class/net/tunl0/mtu"]).stdout.strip()
        assert mtu == "1480", "the ipip module's tunl0 takes eth0's 1500 minus 20"
        too_large = node.run([AGENT, "mtu", "--check"], check=False)
        # The agent says the same once at start (no charon needed for that).
        agent = node.spawn(
            [AGENT, "agent", "--node", node.name, "--keys", str(tmp_path / "none"),
             "--vici", f"unix://{tmp_path}/none.vici", "--no-guard", "--metrics-port", "0",
             "--node-key", str(tmp_path / "node.key")],
            node.dir / "agent.log",
        )  # fmt: skip
        warning = wait_for("the agent's MTU warning", lambda: agent_events(node, "MTU too large"))
        agent.kill()
        node.run(["ip", "link", "set", "tunl0", "mtu", "1446"])
        fits = node.run([AGENT, "mtu", "--check"], check=False)
        stated = node.run([AGENT, "mtu", "--check", "--external-mtu", "1400"], check=False)
    assert too_large.returncode == 1 and too_large.stdout == ""
    assert too_large.stderr == (
        "tunl0's MTU 1480 is too large for IPsec over a 1500-byte network (eth0), so larger "
        "pod packets will be dropped: set it to 1446 with Calico's ipipMTU in the "
        "FelixConfiguration (or veth_mtu in the calico-config ConfigMap, or "
        "spec.calicoNetwork.mtu with the operator)\n"
    )
    assert (fits.returncode, fits.stderr) == (0, "")
    assert (
        fits.stdout
        == "tunl0's MTU 1446 fits IPsec over a 1500-byte network (eth0), which allows up to 1446\n"
    )
    assert stated.returncode == 1 and "set it to 1346" in stated.stderr
    assert len(warning) == 1
    assert (warning[0]["level"], warning[0]["set_to"], warning[0]["mtu"]) == ("warning", 1446, 1480)
