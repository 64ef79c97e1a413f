"""Render what charon is told from the keyring, through operator-overridable templates.

Pure: no I/O beyond reading templates. The agent and the `render` command share this,
so what an operator previews is exactly what the agent loads.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from overlay_vici.agent.sa_plan import lower_ip_leads
from overlay_vici.core.contract import CONN_PREFIX, conn_name
from overlay_vici.core.keyring import Generation, Keyring, Peer, parse_ip, psk_for, public_bytes
from overlay_vici.core.options import seconds


def _builtin_templates() -> Path:
    """The checkout's templates/swanctl, or the copy a wheel installs under sys.prefix."""
    if configured := os.environ.get("OVERLAY_VICI_TEMPLATES"):
        return Path(configured)
    checkout = Path(__file__).resolve().parents[2] / "templates" / "swanctl"
    installed = Path(sys.prefix) / "share" / "overlay-vici" / "templates" / "swanctl"
    return checkout if checkout.is_dir() else installed


BUILTIN_TEMPLATES = _builtin_templates()
_DURATION = re.compile(r"^\d+[smhd]?$")
_PROPOSAL = re.compile(r"^[a-z0-9_]+(-[a-z0-9_]+)*$")


class SettingsError(ValueError):
    """A setting is malformed; the message says which and what form it needs."""


@dataclass(frozen=True)
class Settings:
    """Knobs an operator may turn; defaults follow the project's security baseline."""

    ike_proposals: str = "aes128gcm16-prfsha256-x25519"
    esp_proposals: str = "aes128gcm16-x25519"
    ike_rekey_time: str = "4h"
    child_rekey_time: str = "1h"
    reauth_time: str = "0"
    dpd_delay: str = "30s"

    def __post_init__(self) -> None:
        for name in ("ike_rekey_time", "child_rekey_time", "reauth_time", "dpd_delay"):
            if not _DURATION.fullmatch(getattr(self, name)):
                raise SettingsError(
                    f"{name} {getattr(self, name)!r} is not a duration like 30s, 1h or 0"
                )
        for name in ("ike_proposals", "esp_proposals"):
            if not _PROPOSAL.fullmatch(getattr(self, name)):
                raise SettingsError(
                    f"{name} {getattr(self, name)!r} is not a strongSwan proposal "
                    "like aes128gcm16-x25519"
                )


SECRET_PREFIX = f"ike-{CONN_PREFIX}"  # swanctl takes a secret's type from its name prefix
# Kernel policy priority of a pair's CHILD_SAs (the lower wins; strongSwan points the policy
# at the SA whose priority is lowest, the newest on a tie). At a make-before-break
# reauthentication the responder installs the new SA before it answers, and would send on
# it at once, before the initiator has it inbound: that gap lost a probe now and then. The
# lower-IP end reauthenticates (sa_plan); the higher-IP end, the responder, gives each new
# key generation a worse priority, so that it keeps sending on the old SA until the old
# IKE_SA is deleted, when both ends hold the new one. The initiator's stays the same: its
# new SA wins at once, and the responder installed that one before answering. Low values:
# ahead of the sizes strongSwan computes for any other policy on these addresses.
POLICY_PRIORITY = 1000


def secret_id(peer_name: str, generation: int) -> str:
    return f"{SECRET_PREFIX}{peer_name.replace('.', '_')}-g{generation}"


def is_owned_conn(name: str) -> bool:
    """Only what the agent named is its to unload; an operator's own connections stay."""
    return name.startswith(CONN_PREFIX)


def is_owned_secret(key_id: str) -> bool:
    return key_id.startswith(SECRET_PREFIX)


def policy_priority(keyring: Keyring, node: Peer, peer: Peer) -> int:
    """See POLICY_PRIORITY: worse with every generation on the reauthentication's responder."""
    if lower_ip_leads(parse_ip(node.ip), parse_ip(peer.ip)):
        return POLICY_PRIORITY
    return POLICY_PRIORITY + max(gen.id for gen in keyring.generations)


def ike_rand_time(settings: Settings, keyring: Keyring) -> str:
    """strongSwan's default (a tenth of the longer of rekey and reauth time) plus the sent
    generation's parity. charon's `initiate` reuses an IKE_SA whose connection config is
    equal to the loaded one; after a switch of the sent generation the stale IKE_SAs' config
    differs, so the agent's reauthentication (sa_plan.plan_sas) gets a new IKE_SA beside
    the stale one, while an initiation racing a trap's acquire still shares one."""
    longest = int(max(seconds(settings.ike_rekey_time), seconds(settings.reauth_time)))
    return f"{longest // 10 + keyring.sent % 2}s"


def owners(peer: Peer, sent: bool) -> list[str]:
    """Owners that tie a key to its one peer. charon verifies a peer's AUTH with every key
    whose owners match either end's identity, so a key owned by this node's own address
    would verify any peer with any pair's key: a node holding its pair key with us could
    pass as a third node. Owned by the peer alone, a key verifies only that peer. The sent
    key names the peer's address exactly; an accepted one names it as a /32 subnet, which
    charon ranks one wildcard lower, so that it sends the sent key and verifies with both."""
    return [peer.ip] if sent else [f"{peer.ip}/32"]


# The per-pair PSKs of the last render, by (generation, node, peer, own public key): a
# keyring change re-derives only the keys of new peers, public keys or generations (HKDF
# was 18 % of a one-peer change at N=1000, BENCHMARKS.md). Replaced by what each render
# used, so that it never holds a retired generation's keys for longer than one render.
PskKey = tuple[Generation, Peer, Peer, bytes | None]
_psk_cache: dict[PskKey, str | None] = {}


def _cached_psks(
    keyring: Keyring, node: Peer, peers: list[Peer], own: X25519PrivateKey | None
) -> dict[tuple[Generation, Peer], str | None]:
    """Every (generation, peer) PSK this render needs, in hex (None: the pair has none in
    that generation); derived only when new."""
    own_pub = public_bytes(own) if own is not None else None
    used: dict[PskKey, str | None] = {}
    for peer in peers:
        for gen in keyring.generations:
            key = (gen, node, peer, own_pub)
            used[key] = _psk_cache[key] if key in _psk_cache else _derive(gen, node, peer, own)
    _psk_cache.clear()
    _psk_cache.update(used)
    return {(gen, peer): psk for (gen, _, peer, _), psk in used.items()}


def _derive(gen: Generation, node: Peer, peer: Peer, own: X25519PrivateKey | None) -> str | None:
    psk = psk_for(gen, node, peer, own)
    return psk.hex() if psk is not None else None


def keyed_peers(
    keyring: Keyring, node: Peer, own: X25519PrivateKey | None
) -> tuple[list[Peer], list[Peer]]:
    """The peers this node loads a connection for, and those it has no sent-generation PSK
    with. In a generation with node keys, a peer without a published public key gets no
    connection (its IPIP stays with the guard, dropped). While this node's own key is not
    the published one (a new key, not yet in the keyring) it has no PSK with anyone, but its
    connections stay: the SAs up keep carrying traffic until the master publishes the key."""
    sent = keyring.generation(keyring.sent)
    others = [peer for peer in keyring.peers if peer.name != node.name]
    if not sent.node_keys:
        return others, []
    connected = [peer for peer in others if peer.pub is not None]
    if own is None or node.pub != public_bytes(own):
        return connected, others
    return connected, [peer for peer in others if peer.pub is None]


@lru_cache(maxsize=8)
def _environment(override_dir: Path | None) -> jinja2.Environment:
    """Cached: compiling the templates costs more than rendering them."""
    search = [str(override_dir)] if override_dir else []
    search.append(str(BUILTIN_TEMPLATES))
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(search),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def local_node(keyring: Keyring, node_name: str) -> Peer:
    node = keyring.peer(node_name)
    if node is None:
        raise LookupError(
            f"node {node_name} is not in the keyring's peer list; check the agent's --node "
            "or wait for the master to add this node"
        )
    return node


Secret = tuple[str, tuple[str, ...], str]  # (id, owners, hex PSK)


@dataclass(frozen=True)
class Part:
    """One peer's share of swanctl.conf: the template rendered with `peers` holding that one
    peer (None: the part of a node with no peer). `key` is everything that varies between
    the parts of one node, so that within a Parts equal keys render equal text."""

    first: bool  # the part that opens the file (its header)
    peer: Peer | None
    priority: int
    secrets: tuple[Secret, ...]

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.first, self.peer, self.priority, self.secrets)

    def render(self, template: jinja2.Template, common: dict[str, Any]) -> str:
        """Template.render without its per-call overhead (a third of rendering 1,000 small
        parts): the same context, the template's globals included."""
        peers = []
        if self.peer is not None:
            peers.append(
                {
                    "name": self.peer.name,
                    "ip": self.peer.ip,
                    "conn": conn_name(self.peer.name),
                    "priority": self.priority,
                    "secrets": [
                        {"id": key_id, "owners": list(ids), "hex": hex_psk}
                        for key_id, ids, hex_psk in self.secrets
                    ],
                }
            )
        variables = {**template.globals, **common, "first": self.first, "peers": peers}
        return "".join(template.root_render_func(template.new_context(variables, shared=True)))


@dataclass(frozen=True)
class Parts:
    """swanctl.conf for one node, a part per peer. `shared` is what every part depends on
    (node, settings, ike_rand_time, enforce), compared once rather than per part."""

    shared: tuple[Any, ...]
    each: list[Part]

    @property
    def common(self) -> dict[str, Any]:
        node, settings, rand_time, enforce = self.shared
        return {"node": node, "settings": settings, "ike_rand_time": rand_time, "enforce": enforce}


def swanctl_template(templates: Path | None = None) -> jinja2.Template:
    """swanctl.conf.j2, from the override directory if it has one (looked up once a
    build: jinja checks the file's mtime at every lookup)."""
    return _environment(templates).get_template("swanctl.conf.j2")


def parts(
    keyring: Keyring,
    node_name: str,
    settings: Settings,
    enforce: bool = True,
    own: X25519PrivateKey | None = None,
) -> Parts:
    """swanctl.conf for one node, a part per peer (one part with no peer if it has none).
    `enforce` False: connections that answer the peers but trap nothing (the switch's
    prepare step), so that no policy exists until the switch. `own`: this node's private
    key, for generations with node keys."""
    node = local_node(keyring, node_name)
    others, _ = keyed_peers(keyring, node, own)
    psks = _cached_psks(keyring, node, others, own)
    shared = (node, settings, ike_rand_time(settings, keyring), enforce)
    if not others:
        return Parts(shared, [Part(True, None, 0, ())])
    each = [
        Part(
            index == 0,
            peer,
            policy_priority(keyring, node, peer),
            tuple(
                (
                    secret_id(peer.name, gen.id),
                    tuple(owners(peer, gen.id == keyring.sent)),
                    psk,
                )
                for gen in keyring.generations
                if (psk := psks[(gen, peer)]) is not None
            ),
        )
        for index, peer in enumerate(others)
    ]
    return Parts(shared, each)


def swanctl_conf(
    keyring: Keyring,
    node_name: str,
    settings: Settings,
    templates: Path | None = None,
    enforce: bool = True,
    own: X25519PrivateKey | None = None,
) -> str:
    """The swanctl.conf for one node: a connection per peer and its per-pair keys, as the
    agent loads it (its parts in peer order; swanctl merges the repeated sections)."""
    template = swanctl_template(templates)
    whole = parts(keyring, node_name, settings, enforce, own)
    common = whole.common
    return "".join(part.render(template, common) for part in whole.each)


def strongswan_conf(
    vici_socket: str, log_file: str | None = None, templates: Path | None = None
) -> str:
    template = _environment(templates).get_template("strongswan.conf.j2")
    return template.render(vici_socket=vici_socket, log_file=log_file)
