"""Pod-to-pod throughput and CPU on a real kernel: plain IPIP, IPIP+ESP AES-GCM-128 (this
project: real charons and agents, guard on), and WireGuard (the kernel module, Calico's other
encryption), beside the underlay without any tunnel, in the same run.

Runs inside the qemu guest on Debian's kernel (scripts/qemu-guest): two nodes as network
namespaces on a bridge, iperf3 (TCP, one stream) from n1's pod IP to n2's. Each round sets
every mode up afresh and measures them one after another, so that drifting host load hits all
alike; the table gives the median over the rounds.

    scripts/qemu-guest -- .venv/bin/python bench/bench_dataplane.py --seconds 10 --rounds 3

CPU is the whole guest's (both nodes share its kernel: sender, receiver, softirq, the
crypto), from /proc/stat, as CPU-seconds per GB received. The guest runs under TCG (software
emulation) on a shared machine: the numbers compare the modes with each other, nothing more.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "uml"))

from cluster import Cluster
from mesh import Mesh, Node, ip_batch, ping_once

from overlay_vici.agent.mtu import ipip_mtu

IPERF_PORT = 5201
WG_PORT = 51820
WG_MTU = 1440  # Calico's WireGuard MTU on a 1500-byte IPv4 network
AGENT_ARGS = ["--resync", "2"]


@dataclass(frozen=True)
class Sample:
    mbit_per_s: float
    cpu_s_per_gb: float
    busy_percent: float  # of all guest CPUs, over the transfer
    retransmits: int


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole guest."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def iperf(src: Node, dst: Node, source: str, target: str, seconds: int) -> Sample:
    """One TCP stream source -> target for `seconds`; the guest's CPU over the same span."""
    server = dst.spawn(
        ["iperf3", "-s", "-1", "-B", target, "-p", str(IPERF_PORT)], dst.dir / "iperf3-s.log"
    )
    try:
        time.sleep(1.0)  # the server listens
        hz = os.sysconf("SC_CLK_TCK")
        busy0, total0 = cpu_times()
        result = src.run(
            ["iperf3", "-J", "-c", target, "-B", source, "-p", str(IPERF_PORT), "-t", str(seconds)],
            timeout=seconds + 60,
        )
        busy1, total1 = cpu_times()
    finally:
        server.wait(30)
    end = json.loads(result.stdout)["end"]
    received = end["sum_received"]
    gigabytes = received["bytes"] / 1e9
    return Sample(
        mbit_per_s=received["bits_per_second"] / 1e6,
        cpu_s_per_gb=(busy1 - busy0) / hz / gigabytes,
        busy_percent=100.0 * (busy1 - busy0) / (total1 - total0),
        retransmits=end["sum_sent"].get("retransmits", 0),
    )


def set_tunl0_mtu(mesh: Mesh, mtu: int) -> None:
    for node in mesh.nodes:
        ip_batch([f"link set tunl0 mtu {mtu}"], netns=node.name)


def reachable(mesh: Mesh) -> None:
    src, dst = mesh.nodes
    for _ in range(30):
        if ping_once(src, dst, count=1, timeout=2).received:
            return
    raise RuntimeError(f"no pod ping {src.name} -> {dst.name}")


@contextmanager
def underlay(mesh: Mesh) -> Iterator[tuple[str, str]]:
    src, dst = mesh.nodes
    yield src.ip, dst.ip


@contextmanager
def plain_ipip(mesh: Mesh) -> Iterator[tuple[str, str]]:
    src, dst = mesh.nodes
    reachable(mesh)
    yield src.pod_ip, dst.pod_ip


@contextmanager
def ipip_esp(mesh: Mesh) -> Iterator[tuple[str, str]]:
    """overlay-vici as deployed: a charon and an agent per node, tunl0 at the MTU that fits."""
    set_tunl0_mtu(mesh, ipip_mtu(1500))
    Cluster(mesh, AGENT_ARGS).up()
    reachable(mesh)  # the first packets meet the trap while the SA is negotiated
    src, dst = mesh.nodes
    yield src.pod_ip, dst.pod_ip


@contextmanager
def wireguard(mesh: Mesh) -> Iterator[tuple[str, str]]:
    """Calico's WireGuard mode reduced to its data plane: a wg device per node, pod routes
    through it instead of tunl0."""
    keys = {}
    for node in mesh.nodes:
        private = node.run(["wg", "genkey"]).stdout.strip()
        key_file = node.dir / "wg.key"
        node.dir.mkdir(parents=True, exist_ok=True)
        key_file.touch(mode=0o600)
        key_file.write_text(private + "\n")
        keys[node.name] = (key_file, node.run(["wg", "pubkey"], stdin=private).stdout.strip())
    for node in mesh.nodes:
        (peer,) = [p for p in mesh.nodes if p is not node]
        ip_batch(["link add wg0 type wireguard", f"link set wg0 mtu {WG_MTU}"], netns=node.name)
        node.run(
            [
                "wg",
                "set",
                "wg0",
                "private-key",
                str(keys[node.name][0]),
                "listen-port",
                str(WG_PORT),
                "peer",
                keys[peer.name][1],
                "endpoint",
                f"{peer.ip}:{WG_PORT}",
                "allowed-ips",
                peer.pod_cidr,
            ]
        )
        ip_batch(
            ["link set wg0 up", f"route replace {peer.pod_cidr} dev wg0 src {node.pod_ip}"],
            netns=node.name,
        )
    reachable(mesh)
    src, dst = mesh.nodes
    yield src.pod_ip, dst.pod_ip


MODES: dict[str, Callable[[Mesh], contextmanager]] = {  # type: ignore[type-arg]
    "underlay (node to node, no tunnel)": underlay,
    "plain IPIP (Calico, unencrypted)": plain_ipip,
    "IPIP + ESP AES-GCM-128 (overlay-vici)": ipip_esp,
    "WireGuard (kernel module)": wireguard,
}


def measure(mode: str, workdir: Path, seconds: int) -> Sample:
    with Mesh(2, workdir) as mesh, MODES[mode](mesh) as (source, target):
        src, dst = mesh.nodes
        return iperf(src, dst, source, target, seconds)


def table(samples: dict[str, list[Sample]]) -> str:
    baseline = statistics.median(s.mbit_per_s for s in samples["plain IPIP (Calico, unencrypted)"])
    rows = [
        "| mode | Mbit/s, median (min-max) | vs plain IPIP | guest CPU s per GB | "
        "guest CPU busy | TCP retransmits |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for mode, runs in samples.items():
        rates = [s.mbit_per_s for s in runs]
        rows.append(
            f"| {mode} | {statistics.median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f}) "
            f"| {statistics.median(rates) / baseline:.2f}x "
            f"| {statistics.median(s.cpu_s_per_gb for s in runs):.1f} "
            f"| {statistics.median(s.busy_percent for s in runs):.0f}% "
            f"| {statistics.median(s.retransmits for s in runs):.0f} |"
        )
    return "\n".join(rows) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="length of each transfer")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per mode")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    if os.environ.get("OVERLAY_VICI_GUEST") != "qemu":
        parser.error(
            "run it in the qemu guest: scripts/qemu-guest -- .venv/bin/python " + sys.argv[0]
        )
    samples: dict[str, list[Sample]] = {mode: [] for mode in MODES}
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for mode in MODES:
                sample = measure(mode, Path(tmp) / f"{round_}-{len(samples[mode])}", args.seconds)
                samples[mode].append(sample)
                print(f"round {round_ + 1}: {mode}: {sample}", flush=True)
    text = table(samples)
    print(
        f"\n{os.cpu_count()} guest CPUs, kernel {os.uname().release}, "
        f"{time.monotonic() - started:.0f} s\n\n{text}",
        end="",
    )
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
