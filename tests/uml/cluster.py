"""overlay-vici on a Mesh: per node a real charon and a real agent process, keys published
the way kubelet updates a mounted Secret. Shared by the data-plane tests and the demo."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import vici
from mesh import SLOWDOWN, Mesh, Node, Pinger, ping_once, swanctl

from overlay_vici.agent.render import strongswan_conf
from overlay_vici.core import keyring as kr
from overlay_vici.core.contract import KEYRING_FILE
from overlay_vici.core.files import publish_secret

AGENT = str(Path(sys.executable).with_name("overlay-vici"))
T = TypeVar("T")


def wait_for(
    what: str, probe: Callable[[], T | None], timeout: float = 30.0, interval: float = 0.5
) -> T:
    """Poll until probe() returns something truthy; fail naming what never happened."""
    timeout *= SLOWDOWN
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Cluster:
    """A Mesh whose nodes run charon + agent, with one keyring published to all of them."""

    def __init__(
        self,
        mesh: Mesh,
        agent_args: Sequence[str] = (),
        keys: Callable[[Node], Path] | None = None,
        node_args: Callable[[Node], Sequence[str]] = lambda node: (),
    ) -> None:
        self.mesh = mesh
        self.agent_args = list(agent_args)
        self.node_args = node_args  # agent flags that name the node's own files
        self.keys = keys or keys_dir  # where each node's agent reads its Secret
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.keyring: kr.Keyring | None = None

    def peers(self, nodes: Sequence[Node] | None = None) -> list[kr.Peer]:
        return [kr.Peer(node.name, node.ip) for node in (nodes or self.mesh.nodes)]

    def start(self, node: Node) -> None:
        node.start_charon(strongswan_conf(str(node.vici_socket), str(node.charon_log)))
        node.wait_vici()
        self.start_agent(node)

    def start_agent(self, node: Node) -> None:
        self.agents[node.name] = node.spawn(
            [
                AGENT,
                "agent",
                "--node",
                node.name,
                "--keys",
                str(self.keys(node)),
                "--vici",
                f"unix://{node.vici_socket}",
                "--status",
                str(status_path(node)),
                "--conf-out",
                str(node.dir / "swanctl.conf"),
                "--node-key",
                str(node.dir / "node.key"),
                *self.agent_args,
                *self.node_args(node),
            ],
            node.dir / "agent.log",
        )

    def publish(self, keyring: kr.Keyring, nodes: Sequence[Node] | None = None) -> None:
        self.keyring = keyring
        for node in nodes or self.mesh.nodes:
            publish_secret(keys_dir(node), {KEYRING_FILE: kr.dumps(keyring)})

    def wait_applied(
        self, serial: int, nodes: Sequence[Node] | None = None, timeout: float = 60.0
    ) -> None:
        for node in nodes or self.mesh.nodes:
            wait_for(
                f"{node.name}'s agent to apply keyring serial {serial}",
                lambda n=node: (status(n) or {}).get("keyring_serial") == serial,
                timeout,
            )

    def up(self, keyring: kr.Keyring | None = None) -> kr.Keyring:
        """Keys published, charon and agent running on every node, keyring applied."""
        keyring = keyring or kr.create(self.peers())
        self.publish(keyring)
        for node in self.mesh.nodes:
            self.start(node)
        self.wait_applied(keyring.serial)
        return keyring


def keys_dir(node: Node) -> Path:
    return node.dir / "keys"


def status_path(node: Node) -> Path:
    return node.dir / "status.json"


def status(node: Node) -> dict[str, Any] | None:
    try:
        return json.loads(status_path(node).read_text())
    except (OSError, ValueError):
        return None


def agent_events(node: Node, event: str) -> list[dict[str, Any]]:
    """The agent's structured log lines for one event."""
    lines = (node.dir / "agent.log").read_text().splitlines()
    entries = [json.loads(line) for line in lines if line.startswith("{")]
    return [entry for entry in entries if entry.get("event") == event]


def loaded(node: Node) -> tuple[set[str], set[str]]:
    """Connection names and shared-key ids that charon holds (its own get-conns/get-shared)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(node.vici_socket))
        session = vici.Session(sock)
        conns = session.get_conns().get("conns", [])
        keys = session.get_shared().get("keys", [])
    return {c.decode() for c in conns}, {k.decode() for k in keys}


def sa_blocks(node: Node) -> dict[str, str]:
    """`swanctl --list-sas` output split per IKE_SA, keyed by connection name."""
    text = swanctl(["--list-sas"], node.vici_socket)
    blocks: dict[str, str] = {}
    for block in re.split(r"\n(?=\S)", text):
        match = re.match(r"(\S+): #\d+", block)
        if match:
            blocks[match[1]] = blocks.get(match[1], "") + block + "\n"
    return blocks


class LocalMaster:
    """`overlay-vici master --local STATE` for a Mesh: STATE is the mesh's workdir, so that
    STATE/<node>/ is the node's directory; run it with `Cluster(mesh, ..., keys=master.keys)`.

    A context manager: leaving it stops the master.
    """

    def __init__(self, mesh: Mesh, args: Sequence[str] = ()) -> None:
        self.mesh = mesh
        self.state = mesh.workdir
        self.nodes_file = self.state / "nodes.json"
        self.args = list(args)
        self.log = self.state / "master.log"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LocalMaster:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    @staticmethod
    def keys(node: Node) -> Path:
        return node.dir / "secret"

    def write_nodes(self, nodes: Sequence[Node] | None = None) -> None:
        entries = [{"name": n.name, "ip": n.ip} for n in (nodes or self.mesh.nodes)]
        tmp = self.nodes_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries))
        tmp.replace(self.nodes_file)

    def start(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        if not self.nodes_file.exists():
            self.write_nodes()
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    AGENT,
                    "master",
                    "--local",
                    str(self.state),
                    "--nodes",
                    str(self.nodes_file),
                    *self.args,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for("the master's first keyring", lambda: self.snapshot().keyring, timeout=30)

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                self.process.wait(10)
            self.process = None

    def rotate(self) -> None:
        """The operator's command, as a process."""
        subprocess.run(
            [AGENT, "rotate", "--local", str(self.state)], check=True, capture_output=True
        )

    def snapshot(self) -> Any:
        from overlay_vici.master.local import read_snapshot

        return read_snapshot(self.state)

    def state_doc(self) -> dict[str, Any]:
        return json.loads(self.snapshot().master or "{}")

    def keyring(self) -> kr.Keyring:
        return kr.loads(self.snapshot().keyring or "")

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        lines = self.log.read_text().splitlines()
        entries = [json.loads(line) for line in lines if line.startswith("{")]
        return [e for e in entries if event is None or e.get("event") == event]


def mode_changes(node: Node, mode: str) -> list[float]:
    """When the agent entered `mode`, from its log (epoch seconds, millisecond resolution)."""
    times = []
    for line in (node.dir / "agent.log").read_text().splitlines():
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        if entry.get("event") == "encryption mode" and entry.get("mode") == mode:
            times.append(datetime.fromisoformat(entry["ts"].replace("Z", "+00:00")).timestamp())
    return times


# --- waits and measures the tests share ---


def ping_every_pair(nodes: Sequence[Node]) -> None:
    """Wait until every pair's pod ping gets through (its SAs are up)."""
    for src in nodes:
        for dst in nodes:
            if src is not dst:
                wait_for(
                    f"{src.name} -> {dst.name} pod ping",
                    lambda s=src, d=dst: ping_once(s, d, count=1, timeout=3).received,
                )


def warm_up(mesh: Mesh) -> None:
    """Trigger every pair's trap policy; the first packets of a pair are dropped meanwhile."""
    pinger = mesh.pinger()
    pinger.start()
    time.sleep(4)
    pinger.stop()
    ping_every_pair(mesh.nodes)


def wait_applied(master: LocalMaster, nodes: Sequence[Node], timeout: float = 60) -> None:
    serial = master.keyring().serial
    for node in nodes:
        wait_for(
            f"{node.name}'s agent to apply keyring serial {serial}",
            lambda n=node: ((status(n) or {}).get("keyring_serial") or 0) >= serial,
            timeout,
        )


def wait_rotated(master: LocalMaster, rotation: int, timeout: float = 120) -> dict[str, Any]:
    return wait_for(
        f"rotation {rotation} to finish",
        lambda: (
            (doc := master.state_doc()).get("rotation") == rotation
            and doc.get("phase") == "idle"
            and doc
        ),
        timeout,
        interval=0.25,
    )


def wait_phase(master: LocalMaster, phase: str, timeout: float = 60) -> None:
    wait_for(f"phase {phase}", lambda: master.state_doc().get("phase") == phase, timeout, 0.2)


def lost_at(pinger: Pinger) -> list[tuple[str, float]]:
    """(pair, time) of each lost probe, midway between the replies around it: the mesh's
    pings run with -D, so every reply line carries its time."""
    result = []
    for src, dst in pinger.pairs:
        text = (pinger.logdir / f"{src.name}-{dst.name}.log").read_text()
        replies = {
            int(seq): float(t)
            for t, seq in re.findall(r"^\[(\d+\.\d+)\] \d+ bytes from .*icmp_seq=(\d+)", text, re.M)
        }
        for seq in range(min(replies, default=0), max(replies, default=0)):
            if seq not in replies:
                before = max(k for k in replies if k < seq)
                after = min(k for k in replies if k > seq)
                share = (seq - before) / (after - before)
                when = replies[before] + (replies[after] - replies[before]) * share
                result.append((f"{src.name}->{dst.name}", round(when, 2)))
    return result
