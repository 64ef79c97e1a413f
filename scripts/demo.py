"""The main job on its embedded default, inside the UML guest (run by scripts/demo).

Three nodes wired like Calico in IPIP mode, the master in local mode publishing the key
Secret, and per node a real charon driven by a real agent. It shows the SAs charon holds,
what crosses the wire, a key rotation under traffic, and the switch off at one moment.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "uml"))

from cluster import AGENT, Cluster, LocalMaster, status, wait_for
from mesh import Mesh, PairStats, ping_once

NODES = 3


def say(title: str, body: str = "") -> None:
    print(f"\n== {title}", flush=True)
    if body:
        print(body.rstrip(), flush=True)


def say_status(master: LocalMaster) -> None:
    """`overlay-vici status --local`, as an operator would run it."""
    command = [AGENT, "status", "--local", str(master.state)]
    say("overlay-vici status", subprocess.run(command, capture_output=True, text=True).stdout)


def sent_lost(stats: dict[tuple[str, str], PairStats]) -> str:
    return f"{sum(s.sent for s in stats.values())}/{sum(s.lost for s in stats.values())}"


def mesh_status(state: Path) -> dict:
    done = subprocess.run(
        [AGENT, "status", "--local", str(state), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout)


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="overlay-vici-demo-"))
    with Mesh(NODES, workdir) as mesh, LocalMaster(mesh, ["--tick", "1s"]) as master:
        say(
            "Nodes (network namespaces on bridge br0, Calico-style tunl0 + onlink routes)",
            "\n".join(f"{n.name}: node {n.ip}, pods {n.pod_cidr}" for n in mesh.nodes),
        )
        master.start()
        cluster = Cluster(
            mesh, ["--resync", "5", "--reauth-jitter", "2", "--reauth-grace", "5"], keys=master.keys
        )
        for node in mesh.nodes:
            cluster.start(node)
        serial = master.keyring().serial
        for node in mesh.nodes:
            wait_for(
                f"{node.name}'s agent",
                lambda n=node: (status(n) or {}).get("keyring_serial") == serial,
            )
        first, second = mesh.nodes[0], mesh.nodes[1]
        wait_for("pod-to-pod ping", lambda: ping_once(first, second, timeout=3).received)
        pinger = mesh.pinger()
        pinger.start()
        time.sleep(3)
        pinger.stop()

        say(f"swanctl --list-sas on {first.name}", first.swanctl("--list-sas"))

        stats, kinds, counters = mesh.observe_traffic(3)
        say(
            "3 s of pod-to-pod pings between every pair, seen on the wire (bridge capture)",
            f"frames: {dict(kinds)}\n"
            f"plaintext IPIP received per node (kernel counter): "
            f"{ {n: c.plain_ipip for n, c in counters.items()} }\n"
            f"ESP received per node: { {n: c.esp for n, c in counters.items()} }\n"
            f"pings sent/lost: {sent_lost(stats)}",
        )

        say_status(master)

        before = mesh_status(master.state)["active_generation"]
        pinger = mesh.pinger()
        pinger.start()
        started = time.monotonic()
        master.rotate()
        wait_for(
            "the rotation to finish",
            lambda: (lambda s: s["active_generation"] != before and not s["rotating"])(
                mesh_status(master.state)
            ),
            timeout=120,
        )
        took = time.monotonic() - started
        time.sleep(1)
        stats = pinger.stop()
        say(
            f"overlay-vici rotate: generation {before} -> "
            f"{mesh_status(master.state)['active_generation']} in {took:.1f} s under traffic",
            f"pings sent/lost during the rotation: {sent_lost(stats)}",
        )
        say_status(master)
        ok = kinds["ipip"] == 0 and all(c.plain_ipip == 0 for c in counters.values())
        say("result", "encrypted: no plaintext IPIP on the wire" if ok else "PLAINTEXT IPIP SEEN")
        return 0 if ok and switch_off(mesh, master) else 1


def switch_off(mesh: Mesh, master: LocalMaster) -> bool:
    """The cluster-wide switch off under traffic: every node at one moment, nothing left."""
    pinger = mesh.pinger()
    pinger.start()
    subprocess.run(
        [AGENT, "encryption", "off", "--local", str(master.state)], check=True, capture_output=True
    )
    at = wait_for("the master to schedule the switch", lambda: master.keyring().encryption.at)
    lead = at - time.time()
    for node in mesh.nodes:
        wait_for(
            f"{node.name} to switch off",
            lambda n=node: (status(n) or {}).get("encryption") == "off" and not n.xfrm_left(),
            timeout=60,
        )
    stats = pinger.stop()
    left = {n.name: len(n.xfrm_left()) + n.guarded() for n in mesh.nodes}
    say(
        "overlay-vici encryption off (the master announces it, waits for every agent, then "
        f"schedules one moment, here {lead:.1f} s ahead)",
        f"pings sent/lost across the switch: {sent_lost(stats)}\n"
        f"XFRM states, policies and guard chains left per node: {left}",
    )
    return not any(left.values())


if __name__ == "__main__":
    sys.exit(main())
