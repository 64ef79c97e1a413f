"""One node against hundreds of live peers, in the User-Mode Linux guest.

The node under test, `nut` (10.99.0.1, the lowest IP: it initiates every pair and does every
reauthentication at a key switch), runs the real `overlay-vici agent` console script and a
real charon started as tests/uml/cluster.py starts them (the project's strongswan.conf, the
agent flags of the UML rotation tests: `--resync 2 --reauth-jitter 1`, guard on, metrics on
port 9541), with keys from the real `overlay-vici master --local` (`--tick 0.5
--agent-timeout 90s`: see MASTER_FLAGS). Its N-1 peers are simulated (bench/peersim.py): a
few charons, each in its own namespace on the same bridge with up to --per-sim node
addresses on its veth and one connection per address, all loaded from the project's own
renderer with the same keyring's PSKs, and a driver that follows the master's keyring into
them and reports for every simulated node to the master, as an agent would. --samples of the
peers are one-address sim hosts with Calico's tunl0 and pod routes, so that pod pings cross
nut <-> peer as IPIP in both directions; the kernel counters (raw PREROUTING, `-p 4 -m
policy --dir in --pol none`) count the plaintext IPIP that nut and those peers receive. The
local master and the sim driver share the guest's one CPU but are no part of a real node:
they are stopped (SIGSTOP) except during the rotation, which needs them; their CPU there is
reported.

Per step N (nodes including nut), in one guest each:
1. agent start -> every peer's SAs up (status.json peers_up == N-1), with the agent's and
   charon's CPU and RSS (/proc) at that moment;
2. a steady window of --window seconds with everything established: CPU of agent and
   charon per minute, and the agent's reconcile steps in it (its own histogram
   overlay_vici_reconcile_duration_seconds, scraped from /metrics before and after); then
   --quiet-window seconds with the agent stopped (SIGSTOP): charon's CPU on its own;
3. one rotation (`overlay-vici rotate --local`): each phase's duration from the master's
   history, then until nut itself reports it done (one generation, nothing stale, all up),
   loss and plaintext on the sampled pairs;
4. charon SIGKILL, started again at once -> every peer's SAs up again (the agent reloads it).

    .venv/bin/python bench/bench_mesh_scale.py --steps 100,300,1000 --out /tmp/mesh-scale.md

runs each step in its own guest (scripts/uml-guest with the kernel scripts/uml-kernel
gives) and writes the markdown table to --out; the raw results, the agent's, master's and
charon's logs go to --results (a directory on the host). PYTHONPATH is set to this
checkout, so the guest runs this checkout's overlay_vici, not whatever the venv's editable
install points at.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "uml"))
sys.path.insert(0, str(ROOT / "bench"))

NUT_IP = ipaddress.ip_address("10.99.0.1")
BRIDGE_IP = "10.99.255.254/16"  # the guest's root namespace on the bridge: /metrics of nut
AGENT_FLAGS = ["--resync", "2", "--reauth-jitter", "1"]  # tests/uml/test_rotation_mesh.py
# The rotation tests' tick; their --agent-timeout (8s) is shorter than one agent step at
# N=1000 in the guest (the switch's reload of 2,997 messages took 15.7 s), and the master then
# skipped nut as expired and finished the rotation without it: the default (90s) here.
MASTER_FLAGS = ["--tick", "0.5", "--agent-timeout", "90s"]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- /proc ---


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM in MiB."""
    found = dict(
        re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    )
    return {k: round(int(v) / 1024, 1) for k, v in found.items()}


def scrape(url: str) -> dict[str, float]:
    """The unlabelled samples of a Prometheus text page (and _sum/_count of histograms)."""
    with urllib.request.urlopen(url, timeout=20) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        match = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*) ([0-9.eE+-]+|NaN)$", line)
        if match:
            samples[match[1]] = float(match[2])
    return samples


def wait_until(what: str, probe: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# --- in the guest ---


class Step:
    """One scale step: the topology, the master, the sims, nut; `run` measures."""

    def __init__(self, nodes: int, args: argparse.Namespace) -> None:
        from peersim import Host

        self.n = nodes
        self.args = args
        self.wd = Path(args.workdir) / f"n{nodes}"
        self.result: dict[str, Any] = {"nodes": nodes, "peers": nodes - 1}
        peers = nodes - 1
        ips = {k: str(NUT_IP + k) for k in range(1, nodes)}
        self.names = {k: f"p{k}" for k in range(1, nodes)}
        samples = min(args.samples, peers)
        sample_ks = sorted({max(1, round((j + 1) * peers / (samples + 1))) for j in range(samples)})
        self.nut = Host("nut", [str(NUT_IP)], self.wd, pod=0)
        self.samples = [
            Host(f"smp{j}", [ips[k]], self.wd, pod=j + 1) for j, k in enumerate(sample_ks)
        ]
        self.sample_nodes = {
            h.name: [self.names[k]] for h, k in zip(self.samples, sample_ks, strict=True)
        }
        rest = [k for k in range(1, nodes) if k not in sample_ks]
        chunks = [rest[i : i + args.per_sim] for i in range(0, len(rest), args.per_sim)]
        self.sims = [
            Host(f"sim{i}", [ips[k] for k in chunk], self.wd) for i, chunk in enumerate(chunks)
        ]
        self.sim_nodes = {
            h.name: [self.names[k] for k in c] for h, c in zip(self.sims, chunks, strict=True)
        }
        self.ips = ips
        self.master: Any = None
        self.cluster: Any = None
        self.driver: subprocess.Popen[bytes] | None = None

    # set-up

    def build(self) -> None:
        from mesh import BRIDGE, ip_batch

        self.wd.mkdir(parents=True, exist_ok=True)
        for name, value in (("gc_thresh1", 4096), ("gc_thresh2", 8192), ("gc_thresh3", 16384)):
            Path(f"/proc/sys/net/ipv4/neigh/default/{name}").write_text(str(value))
        ip_batch(
            [
                f"link add {BRIDGE} type bridge",
                f"link set {BRIDGE} up",
                f"addr add {BRIDGE_IP} dev {BRIDGE}",
            ]
        )
        self.nut.plug(BRIDGE, 16, [h.pod_route() for h in self.samples])
        for host in self.samples:
            host.plug(BRIDGE, 16, [self.nut.pod_route()])
        for host in self.sims:
            host.plug(BRIDGE, 16, [])

    def start_master(self) -> None:
        from cluster import LocalMaster

        everyone = [SimpleNamespace(name="nut", ip=str(NUT_IP))]
        everyone += [SimpleNamespace(name=self.names[k], ip=ip) for k, ip in self.ips.items()]
        self.mesh_like = SimpleNamespace(workdir=self.wd, nodes=everyone)
        self.master = LocalMaster(self.mesh_like, MASTER_FLAGS)
        started = time.monotonic()
        self.master.start()
        self.result["master_first_keyring_s"] = round(time.monotonic() - started, 2)

    def start_sims(self) -> None:
        from peersim import sim_strongswan_conf

        hosts = self.samples + self.sims
        for host in hosts:
            host.start_charon(sim_strongswan_conf(host))
        for host in hosts:
            host.wait_vici(30)
        spec = {
            "nut": "nut",
            "hosts": [
                {
                    "vici": str(h.vici_socket),
                    "nodes": [
                        {"name": n, "ip": ip}
                        for n, ip in zip(
                            {**self.sample_nodes, **self.sim_nodes}[h.name], h.ips, strict=True
                        )
                    ],
                }
                for h in hosts
            ],
        }
        (self.wd / "hosts.json").write_text(json.dumps(spec))
        self.driver_log = self.wd / "driver.log"
        self.driver_out = (self.wd / "driver.out").open("wb")
        self.driver = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "bench" / "peersim.py"),
                "drive",
                "--hosts",
                str(self.wd / "hosts.json"),
                "--state",
                str(self.wd),
                "--log",
                str(self.driver_log),
            ],
            stdout=self.driver_out,
            stderr=subprocess.STDOUT,
        )
        serial = self.master.keyring().serial
        entry = wait_until(
            f"the sim driver to apply keyring serial {serial}",
            lambda: self.driver_applied(serial),
            timeout=300,
        )
        self.result["sim_first_apply_s"] = entry["seconds"]
        self.helpers(signal.SIGSTOP)

    def helpers(self, sig: signal.Signals) -> None:
        """Stop or continue the local master and the sim driver. They run in the same guest
        CPU, but no real node hosts them: the master reads every node's report each tick,
        the driver refreshes every simulated node's report. They are stopped except while a
        rotation needs them (continued driver first, so that every simulated node's report
        is fresh before the master looks at it)."""
        if sig == signal.SIGCONT:
            self.driver.send_signal(sig)
            time.sleep(3)  # peersim.HEARTBEAT and a little: every simulated report fresh
            self.master.process.send_signal(sig)
            time.sleep(1)
        else:
            self.master.process.send_signal(sig)
            self.driver.send_signal(sig)

    def driver_applied(self, serial: int) -> dict[str, Any] | None:
        if self.driver is not None and self.driver.poll() is not None:
            raise RuntimeError(f"the sim driver exited {self.driver.returncode}")
        try:
            lines = self.driver_log.read_text().splitlines()
        except OSError:
            return None
        for line in reversed(lines):
            entry = json.loads(line)
            if entry.get("event") == "applied" and entry["serial"] >= serial:
                return entry
        return None

    def status(self) -> dict[str, Any]:
        from cluster import status

        return status(self.nut) or {}

    def all_up(self, after: float = 0.0) -> dict[str, Any] | None:
        doc = self.status()
        if (
            doc.get("updated", 0) > after
            and doc.get("peers_expected") == self.n - 1
            and doc.get("peers_up") == self.n - 1
        ):
            return doc
        return None

    def agent_pid(self) -> int:
        return self.cluster.agents["nut"].pid

    def charon_pid(self) -> int:
        return self.nut._charon.pid

    def usage(self) -> dict[str, float]:
        agent, charon = self.agent_pid(), self.charon_pid()
        return {
            "agent_cpu": cpu_seconds(agent),
            "charon_cpu": cpu_seconds(charon),
            **{f"agent_{k}": v for k, v in memory(agent).items()},
            **{f"charon_{k}": v for k, v in memory(charon).items()},
            "sims_cpu": sum(cpu_seconds(h._charon.pid) for h in self.samples + self.sims),
            "driver_cpu": cpu_seconds(self.driver.pid) if self.driver else 0.0,
            "master_cpu": cpu_seconds(self.master.process.pid),
        }

    def start_nut(self) -> None:
        from cluster import Cluster, LocalMaster

        from overlay_vici.agent.render import strongswan_conf

        self.charon_conf = strongswan_conf(str(self.nut.vici_socket), str(self.nut.charon_log))
        self.nut.start_charon(self.charon_conf)
        self.nut.wait_vici()
        self.cluster = Cluster(
            self.mesh_like, AGENT_FLAGS + self.args.agent_arg, keys=LocalMaster.keys
        )
        t0 = time.time()
        self.cluster.start_agent(self.nut)
        timeline = []
        last = -1
        timeout = self.args.up_timeout or max(180.0, self.n * 0.6)
        deadline = time.monotonic() + timeout
        while True:
            doc = self.status()
            up = doc.get("peers_up", 0) if doc.get("peers_expected") == self.n - 1 else 0
            if up != last:
                timeline.append((round(time.time() - t0, 2), up))
                last = up
            if up == self.n - 1:
                break
            if self.cluster.agents["nut"].poll() is not None:
                raise RuntimeError("the agent exited")
            if time.monotonic() > deadline:
                self.result["up_timeline"] = timeline
                self.result["up_reached"] = up
                raise TimeoutError(f"only {up} of {self.n - 1} peers up after {timeout:.0f}s")
            time.sleep(0.5)
        took = time.time() - t0
        self.result["start_to_all_up_s"] = round(took, 1)
        self.result["up_timeline"] = timeline
        for share in (0.5, 0.9):
            need = share * (self.n - 1)
            self.result[f"start_to_{int(share * 100)}pct_up_s"] = next(
                t for t, up in timeline if up >= need
            )
        self.result["at_all_up"] = self.usage()

    # measurements

    def pinger(self, label: str) -> Any:
        from mesh import Pinger

        pinger = Pinger([], self.wd / f"ping-{label}")
        pinger.pairs = [(self.nut, h) for h in self.samples] + [(h, self.nut) for h in self.samples]
        pinger.start()
        return pinger

    def counters(self) -> int:
        """Plaintext IPIP received so far by nut and the sampled peers (kernel counters)."""
        return sum(h.read_counters().plain_ipip for h in [self.nut, *self.samples])

    def ping_result(self, stats: dict[Any, Any]) -> dict[str, Any]:
        return {
            "sent": sum(s.sent for s in stats.values()),
            "lost": sum(s.lost for s in stats.values()),
            "longest_outage_s": max((s.longest_outage for s in stats.values()), default=0.0),
        }

    def warm_up(self) -> None:
        from mesh import ping_once

        for host in self.samples:
            wait_until(
                f"nut -> {host.name} pod ping",
                lambda h=host: ping_once(self.nut, h, timeout=3).received,
                60,
            )
            wait_until(
                f"{host.name} -> nut pod ping",
                lambda h=host: ping_once(h, self.nut, timeout=3).received,
                60,
            )
        for host in [self.nut, *self.samples]:
            host.install_ipip_counters()

    def steady(self) -> None:
        url = "http://10.99.0.1:9541/metrics"
        pinger = self.pinger("steady")
        before, m0, t0 = self.usage(), scrape(url), time.monotonic()
        time.sleep(self.args.window)
        after, m1, t1 = self.usage(), scrape(url), time.monotonic()
        stats = pinger.stop()
        minutes = (t1 - t0) / 60
        name = "overlay_vici_reconcile_duration_seconds"
        steps = m1[f"{name}_count"] - m0[f"{name}_count"]
        step_sum = m1[f"{name}_sum"] - m0[f"{name}_sum"]
        agent_cpu = after["agent_cpu"] - before["agent_cpu"]
        self.result["steady"] = {
            "window_s": round(t1 - t0, 1),
            "agent_cpu_s_per_min": round(agent_cpu / minutes, 2),
            "charon_cpu_s_per_min": round(
                (after["charon_cpu"] - before["charon_cpu"]) / minutes, 2
            ),
            "sims_cpu_s_per_min": round((after["sims_cpu"] - before["sims_cpu"]) / minutes, 2),
            "master_cpu_s_per_min": round(
                (after["master_cpu"] - before["master_cpu"]) / minutes, 2
            ),
            "driver_cpu_s_per_min": round(
                (after["driver_cpu"] - before["driver_cpu"]) / minutes, 2
            ),
            "steps": int(steps),
            "step_wall_ms_mean": round(1000 * step_sum / steps, 1) if steps else None,
            "agent_cpu_ms_per_step": round(1000 * agent_cpu / steps, 1) if steps else None,
            "peers_up": self.status().get("peers_up"),
            "ping": self.ping_result(stats),
            "usage_end": after,
        }
        # The same with the agent stopped: what charon costs on its own (DPD, rekeying)
        # against what the agent's steps make it do.
        agent = self.cluster.agents["nut"]
        agent.send_signal(signal.SIGSTOP)
        try:
            c0, t0 = cpu_seconds(self.charon_pid()), time.monotonic()
            time.sleep(self.args.quiet_window)
            c1, t1 = cpu_seconds(self.charon_pid()), time.monotonic()
        finally:
            agent.send_signal(signal.SIGCONT)
        self.result["steady"]["charon_cpu_s_per_min_agent_stopped"] = round(
            (c1 - c0) / ((t1 - t0) / 60), 2
        )
        self.result["steady"]["quiet_window_s"] = round(t1 - t0, 1)
        time.sleep(3)  # a step or so to catch up before the rotation

    def rotation(self) -> None:
        self.helpers(signal.SIGCONT)
        plain0 = self.counters()
        pinger = self.pinger("rotation")
        before = self.usage()
        time.sleep(0.5)
        requested = time.time()
        self.master.rotate()
        timeout = self.args.rotation_timeout or max(240.0, self.n * 0.6)
        doc = wait_until(
            "rotation 1 to finish",
            lambda: (
                (d := self.master.state_doc()).get("rotation") == 1
                and d.get("phase") == "idle"
                and d
            ),
            timeout,
            interval=0.25,
        )
        done = time.time()
        final = self.master.keyring()
        nut_done = wait_until(
            "nut to report the rotation finished (new generation only, none stale, all up)",
            lambda: self.rotated(final, done) and time.time(),
            timeout,
        )
        time.sleep(0.5)
        stats = pinger.stop()
        after = self.usage()
        self.helpers(signal.SIGSTOP)
        history = doc["history"][-1]
        finished = [e for e in self.master.events("rotation done") if e.get("rotation") == 1]
        status = self.status()
        self.result["rotation"] = {
            "rotate_to_stage_s": round(history["stage"] - requested, 2),
            "stage_s": round(history["switch"] - history["stage"], 2),
            "switch_s": round(history["retire"] - history["switch"], 2),
            "retire_s": round(history["idle"] - history["retire"], 2),
            "total_s": round(history["idle"] - requested, 2),
            "seen_done_s": round(done - requested, 2),
            "nut_done_s": round(nut_done - requested, 2),
            "master_skipped": finished[-1].get("skipped", []) if finished else "?",
            "reauthenticating_events": len(self.agent_events("reauthenticating", requested)),
            "agent_cpu_s": round(after["agent_cpu"] - before["agent_cpu"], 2),
            "charon_cpu_s": round(after["charon_cpu"] - before["charon_cpu"], 2),
            "sims_cpu_s": round(after["sims_cpu"] - before["sims_cpu"], 2),
            "master_cpu_s": round(after["master_cpu"] - before["master_cpu"], 2),
            "driver_cpu_s": round(after["driver_cpu"] - before["driver_cpu"], 2),
            "ping": self.ping_result(stats),
            "plain_ipip": self.counters() - plain0,
            "nut_status_after": {
                k: status.get(k)
                for k in ("peers_up", "stale_ike_sas", "reauthenticated", "generations", "ike_sas")
            },
        }

    def rotated(self, keyring: Any, after: float) -> bool:
        """nut's report, written after `after`: the keyring's serial, its one generation
        sent, no stale IKE_SA, every peer up."""
        doc = self.status()
        return bool(
            doc.get("updated", 0) > after
            and (doc.get("keyring_serial") or 0) >= keyring.serial
            and doc.get("generations") == {str(keyring.sent): "sent"}
            and doc.get("stale_ike_sas") == 0
            and doc.get("reauthenticated") is True
            and doc.get("peers_up") == self.n - 1
        )

    def agent_events(self, event: str, since: float) -> list[dict[str, Any]]:
        from datetime import datetime

        found = []
        with contextlib.suppress(OSError):
            for line in (self.nut.dir / "agent.log").read_text().splitlines():
                if line.startswith("{"):
                    entry = json.loads(line)
                    when = datetime.fromisoformat(entry["ts"].replace("Z", "+00:00")).timestamp()
                    if entry.get("event") == event and when >= since:
                        found.append(entry)
        return found

    def restart(self) -> None:
        plain0 = self.counters()
        pinger = self.pinger("restart")
        time.sleep(0.5)
        killed = time.time()
        self.nut.stop_charon(signal.SIGKILL)
        self.nut.start_charon(self.charon_conf)
        self.nut.wait_vici()
        vici_back = time.time() - killed
        # The first report after the kill may still carry the old charon's count: wait for
        # one that shows the loss, then for one from the new charon with every peer up.
        missing = wait_until(
            "the agent to report the new charon's SAs missing",
            lambda: (
                (d := self.status()).get("updated", 0) > killed
                and (not d.get("charon_connected") or d.get("peers_up") != self.n - 1)
                and d
            ),
            60,
            0.2,
        )
        timeout = self.args.up_timeout or max(180.0, self.n * 0.6)
        wait_until(
            "every peer's SAs up again",
            lambda: (d := self.all_up(missing["updated"])) and d.get("charon_connected"),
            timeout,
            0.5,
        )
        up = time.time() - killed
        time.sleep(0.5)
        stats = pinger.stop()
        self.result["restart"] = {
            "charon_vici_back_s": round(vici_back, 2),
            "kill_to_all_up_s": round(up, 1),
            "ping": self.ping_result(stats),
            "plain_ipip": self.counters() - plain0,
            "usage_after": self.usage(),
        }

    def run(self) -> None:
        stages = [
            ("build", self.build),
            ("master", self.start_master),
            ("sims", self.start_sims),
            ("establish", self.start_nut),
            ("warm_up", self.warm_up),
            ("steady", self.steady),
            ("rotation", self.rotation),
            ("restart", self.restart),
        ]
        for name, stage in stages:
            log(f"N={self.n}: {name}")
            started = time.monotonic()
            try:
                stage()
            except Exception as exc:
                self.result["failed_at"] = name
                self.result["error"] = f"{type(exc).__name__}: {exc}"
                log(f"N={self.n}: {name} failed: {self.result['error']}")
                return
            finally:
                self.result.setdefault("stage_s", {})[name] = round(time.monotonic() - started, 1)

    def close(self, keep: Path) -> None:
        for process in (self.driver, self.master and self.master.process):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGCONT)
        if self.driver is not None:
            self.driver.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.driver.wait(10)
        if self.master is not None:
            self.master.stop()
        for host in [self.nut, *self.samples, *self.sims]:
            host.kill_all()
        self.result["logs"] = self.log_summary()
        keep.mkdir(parents=True, exist_ok=True)
        for path in [
            self.wd / "master.log",
            self.wd / "driver.log",
            self.nut.dir / "agent.log",
            self.nut.dir / "charon.log",
            self.nut.dir / "status.json",
        ]:
            if path.exists():
                shutil.copy(path, keep / path.name)
        for host in self.samples + self.sims:
            if host.charon_log.exists():
                shutil.copy(host.charon_log, keep / f"{host.name}-charon.log")

    def log_summary(self) -> dict[str, Any]:
        """The agent's warnings and errors by event, and nut's charon's retransmissions."""
        events: dict[str, int] = {}
        with contextlib.suppress(OSError):
            for line in (self.nut.dir / "agent.log").read_text().splitlines():
                if line.startswith("{"):
                    entry = json.loads(line)
                    if entry.get("level") in ("warning", "error"):
                        key = f"{entry['level']}: {entry.get('event')}"
                        events[key] = events.get(key, 0) + 1
        retransmits = 0
        with contextlib.suppress(OSError), self.nut.charon_log.open(errors="replace") as text:
            retransmits = sum("retransmit" in line for line in text)
        return {"agent_warnings_errors": events, "nut_charon_retransmit_lines": retransmits}


def guest_main(args: argparse.Namespace) -> int:
    if os.environ.get("OVERLAY_VICI_UML") != "1":
        print(
            "--in-guest: only inside scripts/uml-guest (it rewires the kernel's network)",
            file=sys.stderr,
        )
        return 2
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500m", "tmpfs", str(workdir)], check=True)
    step = Step(args.nodes, args)
    step.result["guest"] = {
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }
    try:
        step.run()
    finally:
        step.result["guest"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
        step.close(Path(args.keep))
        Path(args.result).write_text(json.dumps(step.result, indent=1))
        log(f"N={args.nodes}: result in {args.result}")
    return 0


# --- on the host ---


def host_main(args: argparse.Namespace) -> int:
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    kernel = subprocess.run(
        [str(ROOT / "scripts" / "uml-kernel")], check=True, capture_output=True, text=True
    ).stdout.strip()
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "overlay_vici", "templates"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    env = {**os.environ, "OVERLAY_VICI_UML_KERNEL": kernel, "PYTHONPATH": str(ROOT)}
    results = []
    for nodes in [int(s) for s in args.steps.split(",")]:
        result_file = results_dir / f"n{nodes}.json"
        result_file.unlink(missing_ok=True)
        uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        log(f"step N={nodes} (nut + {nodes - 1} simulated peers); host: {uptime_before}")
        started = time.monotonic()
        command = [
            str(ROOT / "scripts" / "uml-guest"),
            "--mem",
            args.mem,
            "--timeout",
            str(args.guest_timeout),
            "--",
            sys.executable,
            str(Path(__file__).resolve()),
            "--in-guest",
            "--nodes",
            str(nodes),
            "--result",
            str(result_file),
            "--keep",
            str(results_dir / f"n{nodes}-logs"),
            "--per-sim",
            str(args.per_sim),
            "--samples",
            str(args.samples),
            "--window",
            str(args.window),
            "--quiet-window",
            str(args.quiet_window),
            "--workdir",
            args.workdir,
        ]
        for extra in args.agent_arg:
            command.append(f"--agent-arg={extra}")  # a value may start with --
        if args.up_timeout:
            command += ["--up-timeout", str(args.up_timeout)]
        if args.rotation_timeout:
            command += ["--rotation-timeout", str(args.rotation_timeout)]
        code = subprocess.run(command, cwd=ROOT, env=env, check=False).returncode
        wall = time.monotonic() - started
        uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        try:
            result = json.loads(result_file.read_text())
        except (OSError, ValueError):
            result = {
                "nodes": nodes,
                "peers": nodes - 1,
                "failed_at": "guest",
                "error": f"uml-guest exited {code}, no result",
            }
        result["host"] = {
            "uptime_before": uptime_before,
            "uptime_after": uptime_after,
            "guest_wall_s": round(wall, 1),
            "guest_exit": code,
        }
        results.append(result)
        result_file.write_text(json.dumps(result, indent=1))
        if "failed_at" in result and not args.keep_going:
            log(f"N={nodes} failed at {result['failed_at']}: {result['error']}; stopping")
            break
    table = markdown(results, commit + (" (with uncommitted changes)" if dirty else ""), kernel)
    Path(args.out).write_text(table)
    print(table)
    return 0 if all("failed_at" not in r for r in results) else 1


def _get(result: dict[str, Any], path: str) -> Any:
    value: Any = result
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return "-"
        value = value[part]
    return value


ROWS = [
    ("peers (simulated, live IKE)", "peers"),
    ("agent start -> 50 % of peers up, s", "start_to_50pct_up_s"),
    ("agent start -> 90 % of peers up, s", "start_to_90pct_up_s"),
    ("**agent start -> all peers up**, s", "start_to_all_up_s"),
    ("agent CPU at all up, s", "at_all_up.agent_cpu"),
    ("charon CPU at all up, s", "at_all_up.charon_cpu"),
    ("sim charons' CPU at all up (all of them), s", "at_all_up.sims_cpu"),
    ("agent VmRSS / VmHWM at all up, MiB", ("at_all_up.agent_VmRSS", "at_all_up.agent_VmHWM")),
    ("charon VmRSS / VmHWM at all up, MiB", ("at_all_up.charon_VmRSS", "at_all_up.charon_VmHWM")),
    ("steady window, s", "steady.window_s"),
    ("**steady: agent CPU, s per minute**", "steady.agent_cpu_s_per_min"),
    ("**steady: charon CPU, s per minute**", "steady.charon_cpu_s_per_min"),
    ("steady: sim charons' CPU, s per minute", "steady.sims_cpu_s_per_min"),
    (
        "steady: charon CPU with the agent stopped, s per minute",
        "steady.charon_cpu_s_per_min_agent_stopped",
    ),
    ("steady: agent reconcile steps in the window", "steady.steps"),
    ("**idle step, wall ms (mean, agent's histogram)**", "steady.step_wall_ms_mean"),
    ("idle step, agent CPU ms (window CPU / steps)", "steady.agent_cpu_ms_per_step"),
    ("steady: pings sent / lost (sampled pairs)", ("steady.ping.sent", "steady.ping.lost")),
    ("rotate -> stage, s", "rotation.rotate_to_stage_s"),
    ("stage phase, s", "rotation.stage_s"),
    ("**switch phase (all reauthentications), s**", "rotation.switch_s"),
    ("retire phase, s", "rotation.retire_s"),
    ("**rotation, request -> done (master), s**", "rotation.total_s"),
    ("rotation, request -> nut reports it done, s", "rotation.nut_done_s"),
    ("rotation: agents the master skipped", "rotation.master_skipped"),
    ("rotation: nut's reauthentications (agent log)", "rotation.reauthenticating_events"),
    ("rotation: agent / charon CPU, s", ("rotation.agent_cpu_s", "rotation.charon_cpu_s")),
    ("rotation: sim charons' CPU, s", "rotation.sims_cpu_s"),
    (
        "rotation: local master / sim driver CPU, s",
        ("rotation.master_cpu_s", "rotation.driver_cpu_s"),
    ),
    ("rotation: pings sent / lost", ("rotation.ping.sent", "rotation.ping.lost")),
    ("rotation: longest outage, s", "rotation.ping.longest_outage_s"),
    ("**rotation: plaintext IPIP received**", "rotation.plain_ipip"),
    ("**charon SIGKILL -> all peers up again**, s", "restart.kill_to_all_up_s"),
    ("restart: pings sent / lost", ("restart.ping.sent", "restart.ping.lost")),
    ("restart: longest outage, s", "restart.ping.longest_outage_s"),
    ("restart: plaintext IPIP received", "restart.plain_ipip"),
    ("new charon VmRSS after, MiB", "restart.usage_after.charon_VmRSS"),
    ("guest load average at end (1 min)", "guest.loadavg_end"),
    ("whole step in the guest, s", "host.guest_wall_s"),
]


def markdown(results: list[dict[str, Any]], commit: str, kernel: str) -> str:
    head = "| measure | " + " | ".join(f"N={r['nodes']:,}" for r in results) + " |\n"
    head += "|---|" + "---:|" * len(results) + "\n"
    lines = []
    for label, path in ROWS:
        cells = []
        for r in results:
            if isinstance(path, tuple):
                cells.append(" / ".join(str(_get(r, p)) for p in path))
            elif path == "guest.loadavg_end":
                value = _get(r, path)
                cells.append(value[0] if isinstance(value, list) else "-")
            else:
                cells.append(str(_get(r, path)))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    notes = [
        f"\ncode: {commit}; kernel {kernel} (UML, 1 CPU in the guest)",
    ]
    for r in results:
        host = r.get("host", {})
        notes.append(
            f"N={r['nodes']}: host `{host.get('uptime_before', '?')}` before, "
            f"`{host.get('uptime_after', '?')}` after"
        )
        if "failed_at" in r:
            notes.append(f"N={r['nodes']}: **failed at {r['failed_at']}**: {r['error']}")
    return head + "\n".join(lines) + "\n" + "\n".join(notes) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--steps", default="100,300,1000", help="node counts N incl. nut (default %(default)s)"
    )
    parser.add_argument(
        "--out", default="/tmp/mesh-scale.md", help="markdown table (default %(default)s)"
    )
    parser.add_argument(
        "--results", default="/tmp/mesh-scale", help="raw results and logs (default %(default)s)"
    )
    parser.add_argument(
        "--per-sim",
        type=int,
        default=250,
        help="node addresses per sim charon (default %(default)s)",
    )
    parser.add_argument(
        "--samples", type=int, default=4, help="peers with pods and pings (default %(default)s)"
    )
    parser.add_argument(
        "--window", type=float, default=60.0, help="steady-state window, s (default %(default)s)"
    )
    parser.add_argument(
        "--quiet-window",
        type=float,
        default=30.0,
        help="then with the agent stopped, s (default %(default)s)",
    )
    parser.add_argument("--mem", default="3G", help="guest memory (default %(default)s)")
    parser.add_argument(
        "--guest-timeout", type=int, default=1800, help="per step, s (default %(default)s)"
    )
    parser.add_argument(
        "--up-timeout",
        type=float,
        default=0,
        help="wait for all SAs up, s (default: max(180, 0.6 N))",
    )
    parser.add_argument(
        "--rotation-timeout", type=float, default=0, help="s (default: max(240, 0.6 N))"
    )
    parser.add_argument(
        "--agent-arg",
        action="append",
        default=[],
        help="extra agent flag (repeatable; use --agent-arg=--x)",
    )
    parser.add_argument(
        "--keep-going", action="store_true", help="go on to the next step after a failure"
    )
    parser.add_argument(
        "--workdir",
        default="/tmp/ovv-meshbench",
        help="guest tmpfs mounted here (default %(default)s)",
    )
    parser.add_argument("--in-guest", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--nodes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--keep", help=argparse.SUPPRESS)
    args = parser.parse_args()
    return guest_main(args) if args.in_guest else host_main(args)


if __name__ == "__main__":
    sys.exit(main())
