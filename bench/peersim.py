"""Simulated peers for one node under test, inside the UML guest (bench/bench_mesh_scale.py).

A *sim host* is a network namespace on the mesh's bridge with one charon holding one or many
node addresses on its `eth0`: one IKEv2 connection per address (local_addrs = that address,
remote_addrs = the node under test), with that node's per-pair PSKs from the same keyring.
The messages are the project's own: `overlay_vici.agent.render.swanctl_conf` for the simulated
node on a keyring holding only it and the node under test, then
`overlay_vici.agent.swanctl_conf.to_messages`; only the names are made unique per address
(`sim-<node>`, `sim-<node>-g<generation>`), because one charon holds hundreds of them.

`python bench/peersim.py drive --hosts HOSTS.json --state STATE` is the driver: it follows the
keyring the local master publishes (`STATE/_master/secret/keyring.json`), loads every sim
host's changed keys and connections over VICI and unloads the retired keys, so that a
rotation's stage, switch and retire reach the simulated peers as they reach real agents. It
also writes, for every simulated node, the status report the master reads
(`STATE/<node>/status.json`), refreshed as a heartbeat, so that the master waits for the
simulated peers as it waits for real agents before it moves to the next phase. The simulated
peers never initiate (the node under test has the lowest IP and leads every pair) and never
reauthenticate (the lower-IP end does that); their report says so (`reauthenticated`).

Where a simulated peer differs from a real node: its charon answers for hundreds of node
addresses, so the accepted keys of all of them (owners `[node under test]`) are candidates
when it verifies the node under test's AUTH (charon tries each until one fits); and its
charon turns off the per-IP half-open limits (`block_threshold`, `cookie_threshold_ip`),
which are meant for many peers behind one address, not one peer talking to many addresses.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import functools
import hashlib
import json
import socket
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "uml"))
import vici
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from mesh import CHARON_PLUGINS, Node, ip_batch

from overlay_vici.agent.render import Settings, swanctl_conf
from overlay_vici.agent.swanctl_conf import to_messages
from overlay_vici.core import keyring as kr
from overlay_vici.core.contract import KEYRING_FILE
from overlay_vici.core.files import write_atomic

POLL = 0.3  # seconds between looks at the keyring file
HEARTBEAT = 2.0  # seconds between refreshed status reports (master --agent-timeout is 8 s)


class Host(Node):
    """A namespace on the bridge: the node under test, a sampled peer (one address, Calico's
    tunl0 and pod routes) or a sim host (many addresses). mesh.Node with its own name and
    address, on a /16 (mesh.Node's are 10.99.0.<i>/24)."""

    def __init__(self, name: str, ips: list[str], workdir: Path, pod: int | None = None) -> None:
        super().__init__(0, workdir)
        self.name = name
        self.ips = ips
        self.ip = ips[0]
        self.dir = workdir / name
        self.vici_socket = self.dir / "charon.vici"
        self.charon_log = self.dir / "charon.log"
        self.strongswan_conf = self.dir / "strongswan.conf"
        self.pod = pod
        if pod is not None:
            self.pod_ip = f"10.244.{pod}.1"
            self.pod_cidr = f"10.244.{pod}.0/24"

    def plug(self, bridge: str, prefix: int, pod_routes: list[str]) -> None:
        """Create the namespace, its veth into the bridge, its addresses, and for a node with
        pods Calico's tunl0 with the pod IP and the onlink routes `pod_routes`."""
        veth = f"v-{self.name}"[:15]
        ip_batch(
            [
                f"netns add {self.name}",
                f"link add {veth} type veth peer name eth0 netns {self.name}",
                f"link set {veth} master {bridge} up",
            ]
        )
        commands = ["link set lo up", "link set eth0 up"]
        commands += [f"addr add {ip}/{prefix} dev eth0" for ip in self.ips]
        if self.pod is not None:
            commands += ["link set tunl0 up", f"addr add {self.pod_ip}/32 dev tunl0"]
            commands += pod_routes
        ip_batch(commands, netns=self.name)


def sim_strongswan_conf(host: Host) -> str:
    """The simulated peers' charon: the guest's plugin list, make-before-break as on the node
    under test, a hash table sized for hundreds of IKE_SAs, the per-IP half-open limits off
    (see the module's docstring), and only errors logged (the sims share the one CPU)."""
    return f"""\
charon {{
    load_modular = no
    load = {CHARON_PLUGINS}
    make_before_break = yes
    block_threshold = 1000000
    cookie_threshold = 1000000
    cookie_threshold_ip = 1000000
    ikesa_table_size = 1024
    ikesa_table_segments = 16
    plugins {{
        vici {{
            socket = unix://{host.vici_socket}
        }}
    }}
    filelog {{
        charon {{
            path = {host.charon_log}
            time_format = %T
            ike_name = yes
            flush_line = yes
            default = 0
        }}
    }}
    syslog {{
        daemon {{
            default = -1
        }}
    }}
}}
"""


def sim_messages(
    keyring: kr.Keyring, node: kr.Peer, nut: kr.Peer, now: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """What a real agent on `node` would load for its one peer `nut`, renamed per address:
    (load-conn messages by name, load-shared messages by id)."""
    view = dataclasses.replace(keyring, peers=(nut, node), outside=())
    enforce = keyring.mode_for(node.name, now) == "on"  # as the agent decides
    own = sim_node_key(node.name)
    messages = to_messages(swanctl_conf(view, node.name, Settings(), enforce=enforce, own=own))
    conns: dict[str, Any] = {}
    for body_by_name in messages.conns.values():
        for body in body_by_name.values():
            name = f"sim-{node.name}"
            conns[name] = {name: body}
    shared: dict[str, Any] = {}
    for key_id, message in messages.shared.items():
        generation = key_id.rsplit("-g", 1)[1]
        new_id = f"sim-{node.name}-g{generation}"
        shared[new_id] = {**message, "id": new_id}
    return conns, shared


@functools.cache
def sim_node_key(name: str) -> X25519PrivateKey:
    """A simulated node's key pair, from its name: a bench needs no secret, and the driver
    and the reports must agree on it across restarts."""
    return X25519PrivateKey.from_private_bytes(hashlib.sha256(f"peersim|{name}".encode()).digest())


def session(sock_path: Path) -> tuple[socket.socket, vici.Session]:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(sock_path))
    return sock, vici.Session(sock)


class SimCharon:
    """One sim host's charon as the driver sees it: what it was told last, per name."""

    def __init__(self, vici_socket: Path, nodes: list[kr.Peer]) -> None:
        self.vici_socket = vici_socket
        self.nodes = nodes
        self.conns: dict[str, Any] = {}
        self.shared: dict[str, Any] = {}
        self.loads = 0

    def apply(self, keyring: kr.Keyring, nut: kr.Peer, now: float) -> None:
        conns: dict[str, Any] = {}
        shared: dict[str, Any] = {}
        for node in self.nodes:
            c, s = sim_messages(keyring, node, nut, now)
            conns.update(c)
            shared.update(s)
        sock, sess = session(self.vici_socket)
        with sock:
            # New keys first (a replaced id takes effect at once), then connections, then the
            # retired keys go: the order a real agent's plan sends them in.
            for key_id, message in shared.items():
                if self.shared.get(key_id) != message:
                    sess.load_shared(message)
                    self.loads += 1
            for name, message in conns.items():
                if self.conns.get(name) != message:
                    sess.load_conn(message)
                    self.loads += 1
            for key_id in set(self.shared) - set(shared):
                with suppress(vici.exception.CommandException):
                    sess.unload_shared({"id": key_id})
                self.loads += 1
        self.conns, self.shared = conns, shared


def report(state: Path, node: kr.Peer, keyring: kr.Keyring, now: float) -> None:
    """The status report a real agent writes, as the master reads it (contract.AgentReport)."""
    doc = {
        "node": node.name,
        "updated": now,
        "keyring_serial": keyring.serial,
        "sent_generation": keyring.sent,
        "generations": {
            str(g.id): "sent" if g.id == keyring.sent else "accepted" for g in keyring.generations
        },
        "reauthenticated": True,  # the node under test (lower IP) reauthenticates every pair
        "stale_ike_sas": 0,
        "stale_peers": [],
        "peers_expected": 1,
        "encryption": keyring.mode_for(node.name, now),
        "public_key": base64.b64encode(kr.public_bytes(sim_node_key(node.name))).decode(),
        "simulated": True,
    }
    write_atomic(state / node.name / "status.json", json.dumps(doc), 0o644)


def drive(hosts_file: Path, state: Path, out: Path) -> None:
    """Follow the master's keyring forever (until SIGTERM); log one JSON line per apply."""
    spec = json.loads(hosts_file.read_text())
    nut_name = spec["nut"]
    charons = [
        SimCharon(Path(h["vici"]), [kr.Peer(n["name"], n["ip"]) for n in h["nodes"]])
        for h in spec["hosts"]
    ]
    every = [node for charon in charons for node in charon.nodes]
    source = state / "_master" / "secret" / KEYRING_FILE
    applied_text: str | None = None
    keyring: kr.Keyring | None = None
    last_beat = 0.0
    with out.open("a") as log:
        while True:
            try:
                text = source.read_text()
            except OSError:
                text = None
            if text and text != applied_text:
                started = time.time()
                try:
                    new = kr.loads(text)
                    nut = new.peer(nut_name)
                    if nut is None:
                        raise LookupError(f"{nut_name} is not in the keyring")
                    for charon in charons:
                        charon.apply(new, nut, started)
                    keyring, applied_text = new, text
                    for node in every:
                        report(state, node, keyring, time.time())
                    last_beat = time.time()
                    entry = {
                        "event": "applied",
                        "serial": new.serial,
                        "sent": new.sent,
                        "generations": [g.id for g in new.generations],
                        "seconds": round(time.time() - started, 3),
                        "loads": sum(c.loads for c in charons),
                        "t": started,
                    }
                except (OSError, ValueError, LookupError, vici.exception.CommandException) as exc:
                    entry = {"event": "error", "error": f"{type(exc).__name__}: {exc}"}
                    time.sleep(1)
                log.write(json.dumps(entry) + "\n")
                log.flush()
            elif keyring is not None and time.time() - last_beat >= HEARTBEAT:
                for node in every:
                    report(state, node, keyring, time.time())
                last_beat = time.time()
            time.sleep(POLL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("drive", help="follow the master's keyring into the sim charons")
    d.add_argument("--hosts", type=Path, required=True, help="JSON: nut, hosts[vici, nodes]")
    d.add_argument("--state", type=Path, required=True, help="the local master's STATE")
    d.add_argument("--log", type=Path, required=True, help="JSON lines, one per apply")
    args = parser.parse_args()
    drive(args.hosts, args.state, args.log)


if __name__ == "__main__":
    main()
