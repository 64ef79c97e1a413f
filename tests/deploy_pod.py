"""Run the agent pod's containers the way deploy/overlay-vici.yaml declares them, on this host.

Invoked by tests/test_deploy.py as `unshare --mount --net --pid --fork ... python3 deploy_pod.py`
with a JSON spec on stdin; prints a JSON result. Inside: a tmpfs on /run stands in for the
pod's emptyDirs (charon's /run and the shared /run/overlay-vici), each container's process
runs with only its declared capabilities (setpriv: bounding set, no inheritable ones,
no_new_privs as allowPrivilegeEscalation: false), and its probes are run as kubelet would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

READY_WITHIN = 20.0


def _run(command: list[str], env: dict[str, str], timeout: float = 10) -> dict[str, Any]:
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"rc": None, "stdout": "", "stderr": "timed out"}
    return {"rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr}


def _confined(container: dict[str, Any]) -> list[str]:
    """The container's command, holding only its declared capabilities."""
    caps = ",".join(["-all", *(f"+{c.lower()}" for c in container["caps"])])
    return ["setpriv", "--bounding-set", caps, "--inh-caps", "-all", "--no-new-privs",
            *container["argv"]]  # fmt: skip


def _start(container: dict[str, Any], work: str) -> subprocess.Popen[bytes]:
    log = open(os.path.join(work, f"{container['name']}.log"), "wb")  # noqa: SIM115
    return subprocess.Popen(
        _confined(container),
        env=container["env"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _wait_ready(container: dict[str, Any], process: subprocess.Popen[bytes]) -> dict[str, Any]:
    deadline = time.monotonic() + READY_WITHIN
    result: dict[str, Any] = {"rc": None, "stderr": "never ran"}
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return {"rc": None, "stderr": f"exited with {process.returncode}"}
        result = _run(container["readiness"], container["env"], timeout=5)
        if result["rc"] == 0:
            return result
        time.sleep(0.2)
    return result


def _udp_ports() -> set[int]:
    """Local ports of the UDP sockets in this network namespace (charon's IKE ports)."""
    ports = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with open(table) as handle:
            for line in handle.readlines()[1:]:
                ports.add(int(line.split()[1].rsplit(":", 1)[1], 16))
    return ports


def main() -> int:
    spec = json.load(sys.stdin)
    work = spec["work"]
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run"], check=True)
    os.makedirs("/run/overlay-vici")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    result: dict[str, Any] = {"init": {}, "ready": {}, "live": {}}
    processes: dict[str, subprocess.Popen[bytes]] = {}
    for container in spec["init"]:  # one after the other, each to its end, as kubelet does
        result["init"][container["name"]] = _run(_confined(container), container["env"], 30)
    try:
        for container in spec["containers"]:
            name = container["name"]
            processes[name] = _start(container, work)
            result["ready"][name] = _wait_ready(container, processes[name])
        for container in spec["containers"]:
            result["live"][container["name"]] = _run(container["liveness"], container["env"])
        result["udp_ports"] = sorted(_udp_ports())
        with open("/run/overlay-vici/status.json") as handle:
            result["status"] = json.load(handle)
        charon_env = spec["containers"][0]["env"]
        result["list_sas"] = _run(["swanctl", "--list-sas"], charon_env)
        result["list_conns"] = _run(["swanctl", "--list-conns"], charon_env)
        bare = {k: v for k, v in charon_env.items() if k != "STRONGSWAN_CONF"}
        result["list_sas_bare_env"] = _run(["swanctl", "--list-sas"], bare)
        # A hung agent: its report stops changing; both probes must then fail.
        agent = spec["containers"][1]
        processes["agent"].send_signal(signal.SIGTERM)
        processes["agent"].wait(timeout=10)
        old = time.time() - 600
        os.utime("/run/overlay-vici/status.json", (old, old))
        status = json.load(open("/run/overlay-vici/status.json"))  # noqa: SIM115
        status["updated"] = old
        with open("/run/overlay-vici/status.json", "w") as handle:
            json.dump(status, handle)
        os.utime("/run/overlay-vici/status.json", (old, old))
        result["stale_live"] = _run(agent["liveness"], agent["env"])
        result["stale_ready"] = _run(agent["readiness"], agent["env"])
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.terminate()
        for process in processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
