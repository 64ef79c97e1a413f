"""A Kubernetes-like node mesh inside the UML guest, wired exactly like Calico's IPIP mode.

Each node is a network namespace with a veth (`eth0`, 10.99.0.<i>/24) into the bridge `br0`,
Calico's catch-all `tunl0` holding 10.244.<i>.1/32, and an onlink route over `tunl0` to every
other node's pod /24. Each node can run its own charon, with a private /run and its VICI socket
and log in the node's directory, so tests in the guest's root namespace can drive it.

Only for the UML guest started by scripts/uml-guest: it rewires the running kernel's network.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import signal
import socket
import struct
import subprocess
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

BRIDGE = "br0"
CHARON = "/usr/lib/ipsec/charon"
# The explicit list is what runs stably in the guest: the default set crashes when
# kernel-libipsec finds no /dev/net/tun, and there is no curve25519 plugin (openssl has x25519).
CHARON_PLUGINS = (
    "random nonce openssl aes sha2 sha1 hmac gcm gmp kdf pem pkcs1 x509 pubkey "
    "kernel-netlink socket-default vici"
)
POLL_INTERVAL = 0.25  # process start-up is slow in the guest: poll sparingly
PING_INTERVAL = 0.05  # 20 probes per second and pair
IN_FLIGHT = 5  # probes, 0.25 s: see _ping_stats
UNIX_PATH_MAX = 107  # sun_path holds 108 bytes including the terminating NUL
# The emulated qemu guest (TCG, scripts/qemu-guest) runs everything several times slower
# than UML: timeouts and time bounds stretch by this factor there; what they wait for and
# what the tests assert (plaintext 0 above all) stays the same.
SLOWDOWN = 4.0 if os.environ.get("OVERLAY_VICI_GUEST") == "qemu" else 1.0
# The iptables backend the agents' guards use: they take FELIX_IPTABLESBACKEND, as in a Calico
# cluster (scripts/qemu-lab runs the suites with nft and with legacy); unset, they pick legacy
# (the test counters' backend; the UML kernel has no nf_tables).
GUARD_BACKEND = os.environ.get("FELIX_IPTABLESBACKEND", "").lower() or "legacy"

# Raw PREROUTING sees a packet before IPsec decrypts or drops it. Decrypted ESP comes back
# through PREROUTING with a secpath, so `--pol none` matches only IPIP that arrived in plaintext.
_COUNTER_RULES = {
    "plain_ipip": "-p 4 -m policy --dir in --pol none",
    "esp": "-p 50",
}
_COUNTER_LINE = re.compile(r"^\[(\d+):\d+\] -A PREROUTING .*--comment ovv-(\S+)", re.M)


class CommandFailed(subprocess.CalledProcessError):
    """A CalledProcessError whose message carries the command's stderr, for readable failures."""

    def __str__(self) -> str:
        return f"{shlex.join(self.cmd)} exited {self.returncode}: {(self.stderr or '').strip()}"


def run(
    cmd: Sequence[str], *, check: bool = True, timeout: float = 30.0, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output; with check, fail with its stderr in the message."""
    result = subprocess.run(
        list(cmd),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout * SLOWDOWN,
        check=False,
    )
    if check and result.returncode != 0:
        raise CommandFailed(result.returncode, list(cmd), result.stdout, result.stderr)
    return result


def ip_batch(commands: Iterable[str], *, netns: str | None = None, force: bool = False) -> None:
    """Run many `ip` commands in one process (each process start costs in the guest)."""
    options = ["-n", netns] if netns else []
    if force:  # go on past errors: teardown of whatever is left
        options.append("-force")
    run(["ip", *options, "-batch", "-"], stdin="".join(f"{c}\n" for c in commands), check=not force)


def swanctl(args: Sequence[str], vici_socket: Path, *, timeout: float = 30.0) -> str:
    """Run swanctl against one node's charon and return its stdout."""
    return run(["swanctl", *args, "--uri", f"unix://{vici_socket}"], timeout=timeout).stdout


def default_strongswan_conf(vici_socket: Path, log_file: Path) -> str:
    """A strongswan.conf for one node's charon that works in the guest.

    make_before_break is off by default in 5.9.8: without it reauthentication deletes the old
    SAs before the new ones exist.
    """
    return f"""\
charon {{
    load_modular = no
    load = {CHARON_PLUGINS}
    make_before_break = yes
    plugins {{
        vici {{
            socket = unix://{vici_socket}
        }}
    }}
    filelog {{
        charon {{
            path = {log_file}
            time_format = %T
            time_add_ms = yes
            ike_name = yes
            append = yes
            flush_line = yes
            default = 1
        }}
    }}
}}
"""


@dataclass(frozen=True)
class Counters:
    """Packets a node received: IPIP without IPsec (plaintext on the wire) and ESP."""

    plain_ipip: int
    esp: int


@dataclass(frozen=True)
class PingResult:
    sent: int
    received: int


@dataclass(frozen=True)
class PairStats:
    """What one background ping saw. A probe still in flight when it was stopped is not sent."""

    sent: int
    received: int
    longest_outage: float  # seconds: the longest run of consecutive lost probes

    @property
    def lost(self) -> int:
        return self.sent - self.received


def shortfalls(
    stats: dict[tuple[str, str], PairStats], *, min_sent: int = 1, max_lost: int = 0
) -> dict[str, PairStats]:
    """The pairs that sent too few probes or lost too many, by name: an assertion's message
    that pytest does not truncate to the first few pairs."""
    return {
        f"{src}->{dst}": s
        for (src, dst), s in stats.items()
        if s.sent < min_sent or s.lost > max_lost
    }


class Node:
    """One Kubernetes node: a network namespace, the processes started in it and its charon."""

    def __init__(self, index: int, workdir: Path) -> None:
        self.index = index
        self.name = f"n{index}"
        self.ip = f"10.99.0.{index}"
        self.pod_ip = f"10.244.{index}.1"
        self.pod_cidr = f"10.244.{index}.0/24"
        self.dir = workdir / self.name
        self.vici_socket = self.dir / "charon.vici"
        self.charon_log = self.dir / "charon.log"
        self.strongswan_conf = self.dir / "strongswan.conf"
        self._processes: list[subprocess.Popen[bytes]] = []
        self._charon: subprocess.Popen[bytes] | None = None
        self.guard_backend = GUARD_BACKEND  # where the node's guard is expected

    def __repr__(self) -> str:
        return f"Node({self.name}, {self.ip})"

    def pod_route(self) -> str:
        """Calico's IPIP route to this node's pods, as other nodes hold it."""
        return f"route add {self.pod_cidr} via {self.ip} dev tunl0 onlink"

    def run(
        self,
        cmd: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 30.0,
        stdin: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the node's network namespace."""
        netns_cmd = ["ip", "netns", "exec", self.name, *cmd]
        return run(netns_cmd, check=check, timeout=timeout, stdin=stdin)

    def spawn(
        self, cmd: Sequence[str], log_file: Path, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a long-lived process in the namespace, output to log_file; teardown kills it.

        `ip netns exec` execs the command, so the returned process is the command itself and
        signals reach it directly. env adds to the current environment.
        """
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with log_file.open("wb") as log:
            process = subprocess.Popen(
                ["ip", "netns", "exec", self.name, *cmd],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env} if env else None,
            )
        self._processes.append(process)
        return process

    def start_charon(self, strongswan_conf: str) -> None:
        """Start charon in the node with this strongswan.conf and a private /run.

        `ip netns exec` already puts its command in a new mount namespace, so the tmpfs on /run
        (charon.pid, the default VICI socket) is this charon's alone.
        """
        if self.charon_running():
            raise RuntimeError(f"{self.name}: charon is already running")
        if len(str(self.vici_socket)) > UNIX_PATH_MAX:
            raise ValueError(f"VICI socket path too long for AF_UNIX: {self.vici_socket}")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.strongswan_conf.write_text(strongswan_conf)
        self.vici_socket.unlink(missing_ok=True)  # a stale socket would fool wait_vici
        self._charon = self.spawn(
            ["sh", "-c", 'mount -t tmpfs none /run && exec "$0"', CHARON],
            self.dir / "charon.out",
            env={"STRONGSWAN_CONF": str(self.strongswan_conf)},
        )

    def wait_vici(self, timeout: float = 15.0) -> None:
        """Wait until charon accepts connections on its VICI socket."""
        deadline = time.monotonic() + timeout * SLOWDOWN
        while True:
            if not self.charon_running():
                raise RuntimeError(f"{self.name}: charon is not running\n{self.charon_log_tail()}")
            try:
                with socket.socket(socket.AF_UNIX) as probe:
                    probe.connect(str(self.vici_socket))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name}: no VICI socket after {timeout}s") from None
            time.sleep(POLL_INTERVAL)

    def charon_running(self) -> bool:
        return self._charon is not None and self._charon.poll() is None

    def stop_charon(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 15.0) -> None:
        """Stop charon: SIGTERM removes its SAs and policies, SIGKILL leaves them in the kernel."""
        if self._charon is None:
            return
        if self._charon.poll() is None:
            self._charon.send_signal(sig)
            self._charon.wait(timeout)
        self._charon = None

    def swanctl(self, *args: str, timeout: float = 30.0) -> str:
        """swanctl against this node's charon."""
        return swanctl(args, self.vici_socket, timeout=timeout)

    def charon_log_tail(self, lines: int = 40) -> str:
        try:
            text = self.charon_log.read_text(errors="replace")
        except FileNotFoundError:
            return f"({self.charon_log} does not exist)"
        return "\n".join(text.splitlines()[-lines:])

    def install_ipip_counters(self) -> None:
        """Count received plaintext IPIP and ESP in the raw table (see _COUNTER_RULES)."""
        rules = "".join(
            f"-A PREROUTING {match} -m comment --comment ovv-{name}\n"
            for name, match in _COUNTER_RULES.items()
        )
        # -w: the agents' guards take the xtables lock too (the guest's /run is shared)
        restore = ["iptables-legacy-restore", "--noflush", "-w", "10"]
        self.run(restore, stdin=f"*raw\n{rules}COMMIT\n")

    def read_counters(self) -> Counters:
        saved = self.run(["iptables-legacy-save", "-c", "-t", "raw"]).stdout
        packets = {name: int(count) for count, name in _COUNTER_LINE.findall(saved)}
        return Counters(**{name: packets[name] for name in _COUNTER_RULES})

    def reset_counters(self) -> None:
        self.run(["iptables-legacy", "-w", "10", "-t", "raw", "-Z", "PREROUTING"])

    def xfrm_left(self) -> list[str]:
        """`ip xfrm` states and policies but charon's per-socket bypasses for IKE (they
        belong to its sockets, go with charon and carry no traffic)."""
        entries = []
        for kind in ("state", "policy"):
            text = self.run(["ip", "xfrm", kind]).stdout.strip()
            entries += [e for e in re.split(r"\n(?=src )", text) if e]
        return [e for e in entries if not re.search(r"^\s+socket (in|out) ", e, re.M)]

    def iptables_save(self, *args: str) -> str:
        """iptables-save of the backend the node's guard is in."""
        return self.run([f"iptables-{self.guard_backend}-save", *args]).stdout

    def guarded(self) -> bool:
        """Whether the overlay-vici guard chains exist in the node's iptables."""
        return "OVERLAY-VICI" in self.iptables_save()

    def kill_all(self) -> None:
        """SIGKILL every process started in the node and reap it."""
        for process in self._processes:
            if process.poll() is None:
                process.kill()
            process.wait()
        self._processes.clear()
        self._charon = None


class Mesh:
    """Nodes n1..nN on the bridge br0, each routing every other node's pods over tunl0.

    A context manager: leaving it kills every process it started and deletes the namespaces
    and the bridge, so tests can run one after another in the same guest.
    """

    def __init__(self, n: int, workdir: Path) -> None:
        self.workdir = workdir
        self.nodes: list[Node] = [Node(i, workdir) for i in range(1, n + 1)]
        self._captures: list[Capture] = []

    def __repr__(self) -> str:
        return f"Mesh({[node.name for node in self.nodes]}, {self.workdir})"

    def __enter__(self) -> Mesh:
        try:
            ip_batch(
                [f"link add {BRIDGE} type bridge", f"link set {BRIDGE} up"]
                + [cmd for node in self.nodes for cmd in _plug(node)]
            )
            for node in self.nodes:
                _configure(node, [peer for peer in self.nodes if peer is not node])
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        for capture in self._captures:
            capture.kill()
        self._captures.clear()
        for node in self.nodes:
            node.kill_all()
        # Deleting the veth first: a namespace is torn down asynchronously, and its veth
        # would stay in the root namespace (in the next mesh's way) until then.
        ip_batch(
            [f"link del ovv-{node.name}" for node in self.nodes]
            + [f"netns del {node.name}" for node in self.nodes]
            + [f"link del {BRIDGE}"],
            force=True,
        )
        self.nodes = []

    def add_node(self, index: int | None = None) -> Node:
        """Join a node: wire it up and give every other node the route to its pods."""
        if index is None:
            index = max((node.index for node in self.nodes), default=0) + 1
        node = Node(index, self.workdir)
        ip_batch(_plug(node))
        self.nodes.append(node)
        _configure(node, [peer for peer in self.nodes if peer is not node])
        for peer in self.nodes:
            if peer is not node:
                ip_batch([node.pod_route()], netns=peer.name)
        return node

    def remove_node(self, node: Node) -> None:
        """Take a node away like a deleted VM: its processes die, its routes go from the others."""
        node.kill_all()
        self.nodes.remove(node)
        ip_batch([f"netns del {node.name}"])
        for peer in self.nodes:
            ip_batch([f"route del {node.pod_cidr}"], netns=peer.name)

    def install_ipip_counters(self) -> None:
        for node in self.nodes:
            node.install_ipip_counters()

    def read_counters(self) -> dict[str, Counters]:
        return {node.name: node.read_counters() for node in self.nodes}

    def reset_counters(self) -> None:
        for node in self.nodes:
            node.reset_counters()

    def pinger(self) -> Pinger:
        return Pinger(self.nodes, self.workdir / "ping")

    def observe_traffic(
        self, seconds: float
    ) -> tuple[dict[tuple[str, str], PairStats], Counter[str], dict[str, Counters]]:
        """Ping every pair for `seconds` with counters and a bridge capture on: what the pings
        saw, which protocols crossed the wire, and what each node received."""
        self.install_ipip_counters()
        capture = self.capture()
        pinger = self.pinger()
        pinger.start()
        time.sleep(seconds)
        stats = pinger.stop()
        return stats, capture.stop(), self.read_counters()

    def capture(self) -> Capture:
        """Start tcpdump on the bridge; stop() tells which protocols crossed it."""
        capture = Capture(self.workdir / f"capture-{len(self._captures)}.pcap")
        self._captures.append(capture)
        capture.start()
        return capture


def _plug(node: Node) -> list[str]:
    """Root-namespace `ip` commands creating the node's namespace and its port on the bridge."""
    return [
        f"netns add {node.name}",
        f"link add ovv-{node.name} type veth peer name eth0 netns {node.name}",
        f"link set ovv-{node.name} master {BRIDGE} up",
    ]


def _configure(node: Node, peers: Iterable[Node]) -> None:
    """Address the node like Calico in IPIP mode: pod IP on the catch-all tunl0, onlink routes."""
    ip_batch(
        [
            "link set lo up",
            "link set eth0 up",
            f"addr add {node.ip}/24 dev eth0",
            "link set tunl0 up",
            f"addr add {node.pod_ip}/32 dev tunl0",
        ]
        + [peer.pod_route() for peer in peers],
        netns=node.name,
    )


def ping_once(
    src: Node, dst: Node, *, count: int = 1, timeout: float = 5.0, underlay: bool = False
) -> PingResult:
    """Ping dst from src until count replies came or timeout passed.

    Pod to pod (over tunl0, IPIP) by default; with underlay, node IP to node IP (plain ICMP).
    """
    source, target = (src.ip, dst.ip) if underlay else (src.pod_ip, dst.pod_ip)
    deadline = str(math.ceil(timeout))
    result = src.run(
        ["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-w", deadline, "-I", source, target],
        check=False,
        timeout=timeout + 10,
    )
    match = re.search(r"(\d+) packets transmitted, (\d+) received", result.stdout)
    if match is None:
        raise CommandFailed(result.returncode, result.args, result.stdout, result.stderr)
    return PingResult(sent=int(match[1]), received=int(match[2]))


class Pinger:
    """Pod-to-pod ping between every ordered pair of nodes, 20 probes per second each.

    Stopped with SIGINT, ping prints how many probes it sent; its reply lines tell which
    came back, and so how long the longest outage lasted.
    """

    def __init__(self, nodes: Sequence[Node], logdir: Path) -> None:
        self.pairs = [(src, dst) for src in nodes for dst in nodes if src is not dst]
        self.logdir = logdir
        self._running: dict[tuple[str, str], subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        for src, dst in self.pairs:
            self._running[src.name, dst.name] = src.spawn(
                ["ping", "-n", "-D", "-i", str(PING_INTERVAL), "-I", src.pod_ip, dst.pod_ip],
                self._log(src.name, dst.name),
            )

    def stop(self) -> dict[tuple[str, str], PairStats]:
        """Stop every ping and return its statistics per (source, destination) node name."""
        for process in self._running.values():
            process.send_signal(signal.SIGINT)
        for process in self._running.values():
            process.wait(10)
        stats = {pair: _ping_stats(self._log(*pair).read_text()) for pair in self._running}
        self._running.clear()
        return stats

    def _log(self, src: str, dst: str) -> Path:
        return self.logdir / f"{src}-{dst}.log"


def _ping_stats(output: str) -> PairStats:
    match = re.search(r"(\d+) packets transmitted", output)
    if match is None:
        raise ValueError(f"no ping summary in:\n{output}")
    transmitted = int(match[1])
    answered = {int(seq) for seq in re.findall(r"bytes from .*icmp_seq=(\d+)", output)}
    # The last probes may be unanswered only because ping was stopped: SIGINT ends it without
    # reading the replies already queued, and in the one-CPU guest the last of 30 pings
    # signalled runs up to ~0.2 s later (seen: 3 trailing probes of n6 -> n5 with 2 ms RTTs).
    # At most IN_FLIGHT trailing probes count as unsent; a longer trailing outage counts.
    sent = transmitted
    while sent > transmitted - IN_FLIGHT and sent > 0 and sent not in answered:
        sent -= 1
    outage = longest = 0
    for seq in range(1, sent + 1):
        outage = 0 if seq in answered else outage + 1
        longest = max(longest, outage)
    return PairStats(
        sent=sent,
        received=len(answered & set(range(1, sent + 1))),
        longest_outage=longest * PING_INTERVAL,
    )


class Capture:
    """tcpdump on the bridge. It loses packets in the guest: count protocols seen, not packets."""

    def __init__(self, pcap: Path) -> None:
        self.pcap = pcap
        self.log = pcap.with_suffix(".log")
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        with self.log.open("wb") as log:
            self._process = subprocess.Popen(
                ["tcpdump", "-i", BRIDGE, "-n", "-U", "-s", "64", "-w", str(self.pcap)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while b"listening on" not in self.log.read_bytes():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"tcpdump did not start: {self.log.read_text()}")
            time.sleep(POLL_INTERVAL)

    def stop(self) -> Counter[str]:
        """Stop capturing; count frames by kind: esp, ipip, ike, icmp, arp, ipv6, ..."""
        if self._process is None:
            raise RuntimeError("capture is not running")
        self._process.send_signal(signal.SIGINT)
        self._process.wait(10)
        self._process = None
        return _classify(self.pcap.read_bytes())

    def kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None


_PCAP_MAGIC = bytes.fromhex("d4c3b2a1")  # tcpdump writes host byte order
_ETHER_TYPES = {0x0806: "arp", 0x86DD: "ipv6"}
_IP_PROTOCOLS = {1: "icmp", 4: "ipip", 6: "tcp", 50: "esp"}


def _classify(pcap: bytes) -> Counter[str]:
    """Kinds of Ethernet frames in a little-endian pcap file from tcpdump."""
    kinds: Counter[str] = Counter()
    if pcap[:4] != _PCAP_MAGIC:
        raise ValueError("not a little-endian pcap file")
    offset = 24  # past the file header
    while offset + 16 <= len(pcap):
        (length,) = struct.unpack_from("<I", pcap, offset + 8)
        frame = pcap[offset + 16 : offset + 16 + length]
        offset += 16 + length
        ethertype = int.from_bytes(frame[12:14], "big")
        if ethertype != 0x0800 or len(frame) < 24:
            kinds[_ETHER_TYPES.get(ethertype, f"ether-{ethertype:04x}")] += 1
            continue
        protocol = frame[23]
        udp = 14 + (frame[14] & 0x0F) * 4  # past the IPv4 header, whatever its options
        if protocol == 17 and len(frame) >= udp + 4:
            ports = set(struct.unpack_from(">HH", frame, udp))
            kinds["ike" if ports & {500, 4500} else "udp"] += 1
        else:
            kinds[_IP_PROTOCOLS.get(protocol, f"ip-{protocol}")] += 1
    return kinds
