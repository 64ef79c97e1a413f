"""What overlay-vici's three processes say to each other, each name and shape written once.

The master, the agent and report-lease share only three things: the keyring Secret
(master -> agent; its format is core.keyring), the agent's report (agent -> report-lease
-> master) and the removal notice (report-lease -> agent). Everything both ends of one of
those must agree on lives here, so that neither end keeps a copy of the other's names.
Pure, standard library only: every process imports it.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

# --- The keyring Secret (master -> agent) ---
KEYRING_FILE = "keyring.json"  # the only file the agents read
MASTER_FILE = "master.json"  # the master's own state, beside it
DEFAULT_SECRET = "overlay-vici-keys"
OPT_OUT_LABEL = "overlay-vici.io/opt-out"  # a node labelled "true" stays outside the mesh
_NODE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

# The rotation's phases, in order, and the modes of the encryption switch (core.keyring).
PHASES = ("idle", "stage", "switch", "retire")
MODES = ("on", "prepare", "off")

# Prometheus ports (docs/operations.md, "Monitoring").
MASTER_METRICS_PORT = 9540
AGENT_METRICS_PORT = 9541


PUBLIC_KEY_BYTES = 32  # an X25519 public key (and the keyring's root keys)


def decode_public_key(value: object) -> bytes | None:
    """A node's X25519 public key from its base64 text, or None if it is not one."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == PUBLIC_KEY_BYTES else None


def is_node_name(name: object) -> bool:
    """A Kubernetes node name (a DNS subdomain): what a keyring may name a peer."""
    return isinstance(name, str) and len(name) <= 253 and _NODE_NAME.fullmatch(name) is not None


# --- Connection names: the agent's report names peers by the connection it holds to them ---
CONN_PREFIX = "ov-"


def conn_name(peer_name: str) -> str:
    """The agent's connection to a peer: swanctl.conf section names cannot hold dots, and
    node names never hold underscores."""
    return f"{CONN_PREFIX}{peer_name.replace('.', '_')}"


def conn_peer(conn: str) -> str:
    """The peer a reported connection name stands for: conn_name undone, dots included."""
    return conn.removeprefix(CONN_PREFIX).replace("_", ".")


# --- The agent's report (agent -> report-lease -> master) ---
class StatusReport(TypedDict):
    """What the agent writes after every pass (--status FILE), as JSON."""

    node: str
    updated: float  # epoch seconds: the heartbeat
    keyring_serial: int | None
    sent_generation: int | None
    sent_since: float | None
    generations: dict[str, str]  # generation id -> "sent" | "accepted"
    encryption: str | None  # one of MODES: what the agent brought its node to
    switch_at: float | None
    removed_at: float | None
    peers_expected: int
    peers_without_key: int  # peers with no connection: their public key or ours unpublished
    public_key: str | None  # this node's X25519 public key, base64: the master publishes it
    peers_up: int
    ike_sas: int
    stale_ike_sas: int
    stale_peers: list[str]  # connection names (conn_name)
    reauthenticated: bool
    charon_connected: bool
    guard: dict[str, Any] | None
    vici_messages: int
    last_error: str | None


# What report-lease copies into the Lease: what the master needs and `status` shows.
LEASED = (
    "node",
    "updated",
    "keyring_serial",
    "sent_generation",
    "sent_since",
    "generations",
    "encryption",
    "peers_expected",
    "peers_without_key",
    "public_key",
    "peers_up",
    "ike_sas",
    "stale_ike_sas",
    "stale_peers",
    "reauthenticated",
    "last_error",
)


def leased(status: Mapping[str, Any], node: str) -> dict[str, Any]:
    """The report as its Lease carries it, for `node`; it holds no secret (the public key
    is public by design)."""
    return {**{k: status[k] for k in LEASED if k in status}, "node": node}


@dataclass(frozen=True)
class AgentReport:
    """What one agent last said, as the master reads it (from the file or its Lease)."""

    node: str
    heartbeat: float  # when the agent wrote it (epoch seconds)
    keyring_serial: int | None = None
    sent_generation: int | None = None
    generations: Mapping[str, str] = field(default_factory=dict)
    reauthenticated: bool = False
    stale_ike_sas: int = 0
    stale_peers: tuple[str, ...] | None = None  # peer node names, if the agent says
    peers_up: int = 0
    peers_expected: int = 0
    last_error: str | None = None
    encryption: str | None = None  # the switch's mode the agent brought its node to
    public_key: bytes | None = None  # the node's X25519 public key (older agents: none)
    peers_without_key: int = 0

    @classmethod
    def from_status(cls, doc: Mapping[str, Any], node: str | None = None) -> AgentReport | None:
        """Tolerant: a report the master cannot read is as good as none (not live)."""
        name = doc.get("node", node)
        updated = doc.get("updated")
        if not isinstance(name, str) or not is_number(updated):
            return None
        stale_peers = doc.get("stale_peers")
        if isinstance(stale_peers, list):
            stale_peers = tuple(conn_peer(p) for p in stale_peers if isinstance(p, str))
        else:
            stale_peers = None
        generations = doc.get("generations")
        return cls(
            node=name,
            heartbeat=float(updated),
            keyring_serial=int_or_none(doc.get("keyring_serial")),
            sent_generation=int_or_none(doc.get("sent_generation")),
            generations=dict(generations) if isinstance(generations, dict) else {},
            reauthenticated=doc.get("reauthenticated") is True,
            stale_ike_sas=int_or_none(doc.get("stale_ike_sas")) or 0,
            stale_peers=stale_peers,
            peers_up=int_or_none(doc.get("peers_up")) or 0,
            peers_expected=int_or_none(doc.get("peers_expected")) or 0,
            last_error=str_or_none(doc.get("last_error")),
            encryption=str_or_none(doc.get("encryption")),
            public_key=decode_public_key(doc.get("public_key")),
            peers_without_key=int_or_none(doc.get("peers_without_key")) or 0,
        )


# Tolerant readers of JSON values: the wrong type reads as absent.
def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


# --- The agents' Leases (report-lease writes, the master reads) ---
AGENT_LABEL, AGENT_LABEL_VALUE = "overlay-vici.io/role", "agent-ack"
AGENT_SELECTOR = f"{AGENT_LABEL}={AGENT_LABEL_VALUE}"
STATUS_ANNOTATION = "overlay-vici.io/status"
LEASE_PREFIX = "overlay-vici-agent-"
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def lease_name(node: str) -> str:
    return f"{LEASE_PREFIX}{node}"[:253].rstrip(".-")


def in_cluster_namespace() -> str | None:
    """The pod's own namespace, where the master and report-lease default to."""
    try:
        return (SERVICE_ACCOUNT / "namespace").read_text().strip()
    except OSError:
        return None


# --- The removal notice (report-lease -> agent): the install is being deleted ---
def notice_body(at: float, daemonset: str) -> dict[str, Any]:
    return {"at": at, "daemonset": daemonset}


def notice_at(doc: Mapping[str, Any] | None) -> float | None:
    """When the removal was noticed (epoch seconds), from the notice file's JSON (None: no
    notice, or not readable)."""
    at = doc.get("at") if doc else None
    return float(at) if isinstance(at, int | float) else None
