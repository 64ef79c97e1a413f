"""The keyring: the contract between the master (writer) and the agents (readers).

It is a small JSON document. Each *generation* holds a 256-bit root key; exactly one
generation is *sent* (used to build AUTH payloads), the others are only *accepted*
(tried when verifying). The per-pair PSK is derived, never stored, so the Secret grows
with the number of nodes, not with its square.

A generation with `node_keys` binds each pair's PSK to both nodes' X25519 key pairs: the
peer list carries every node's public key, each node holds only its own private key, so a
node can derive the PSKs of its own pairs and of no other (docs/security.md). A
generation without (format 1's only kind) derives every PSK from the root key alone.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
import secrets
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from overlay_vici.core.contract import PUBLIC_KEY_BYTES, decode_public_key, is_node_name

# Format 2 is a keyring with a node_keys generation: an agent that knows only format 1 would
# derive that generation's PSKs from the root key alone, so it refuses the keyring (and
# keeps its last good one) instead of failing every authentication without saying why.
FORMAT_VERSION = 2
FORMAT_VERSIONS = (1, 2)
KEY_BYTES = PUBLIC_KEY_BYTES
# Larger than any keyring for 5,000 nodes, far below what a hostile file could be.
MAX_KEYRING_BYTES = 1024 * 1024
_HKDF_SALT = b"overlay-vici/psk/v1"
_BOUND_INFO = b"overlay-vici/psk/node-keys|"
# A Kubernetes node name is a DNS-1123 subdomain.


class KeyringError(ValueError):
    """The keyring cannot be used; the message is one sentence that says what to fix."""


@dataclass(frozen=True)
class Generation:
    id: int
    key: bytes = field(repr=False)
    node_keys: bool = False  # PSKs bound to both nodes' key pairs (see the module's doc)


@dataclass(frozen=True)
class Peer:
    name: str
    ip: str
    pub: bytes | None = None  # the node's X25519 public key, once its agent reported one


@dataclass(frozen=True)
class Encryption:
    """The cluster-wide on/off switch and the moment it takes effect, the same on every node,
    so that all agents change within about a second of each other. `at` None: the change is
    announced (agents get ready) but not yet scheduled."""

    enabled: bool = True
    at: float | None = 0.0

    def mode(self, now: float) -> str:
        """'on'; 'prepare' (enable announced: keys and connections loaded, nothing enforced,
        so that the first negotiations succeed); or 'off'."""
        due = self.at is not None and now >= self.at
        if self.enabled:
            return "on" if due else "prepare"
        return "off" if due else "on"

    def wait(self, now: float) -> float | None:
        """Seconds until the scheduled moment, if it is still ahead."""
        return self.at - now if self.at is not None and self.at > now else None


@dataclass(frozen=True)
class Keyring:
    serial: int
    sent: int
    generations: tuple[Generation, ...]
    peers: tuple[Peer, ...]
    encryption: Encryption = Encryption()
    # Nodes outside the mesh (opted out): the only hosts IPIP may reach in plaintext.
    outside: tuple[Peer, ...] = ()
    # When the master made `sent` the sent generation (its clock): IKE_SAs authenticated
    # before are stale. One moment for every node, however late each saw the switch.
    sent_since: float | None = None

    def generation(self, gen_id: int) -> Generation:
        return next(g for g in self.generations if g.id == gen_id)

    @property
    def accepted(self) -> tuple[int, ...]:
        """Generations only accepted for verification, never sent."""
        return tuple(g.id for g in self.generations if g.id != self.sent)

    def peer(self, name: str) -> Peer | None:
        return next((p for p in self.peers if p.name == name), None)

    def mode_for(self, node: str, now: float) -> str:
        """The switch's mode on one node: a node outside the mesh is off whatever it says."""
        if any(p.name == node for p in self.outside):
            return "off"
        return self.encryption.mode(now)


def new_generation_key() -> bytes:
    """A fresh root key from the operating system's CSPRNG."""
    return secrets.token_bytes(KEY_BYTES)


def pair_psk(generation: Generation, ip_a: str, ip_b: str) -> bytes:
    """The PSK of one node pair in a generation without node keys: both ends derive the
    same key whatever their order, and so can every holder of the root key."""
    low, high = sorted((ipaddress.ip_address(ip_a), ipaddress.ip_address(ip_b)))
    info = f"{low}|{high}|{generation.id}".encode()
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=_HKDF_SALT, info=info)
    return hkdf.derive(generation.key)


def new_node_key() -> X25519PrivateKey:
    """A node's key pair, from the operating system's CSPRNG (OpenSSL's)."""
    return X25519PrivateKey.generate()


def public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes_raw()


def bound_pair_psk(generation: Generation, own: X25519PrivateKey, node: Peer, peer: Peer) -> bytes:
    """The PSK of one pair in a generation with node keys: X25519 of this node's private key
    and the peer's public key (equal at both ends), through HKDF salted with the root key and
    bound to the pair's addresses, public keys and generation. Only the two nodes can compute
    it; the root key alone, or a third node's private key, gives nothing."""
    if peer.pub is None or node.pub is None:
        raise ValueError("both nodes need a public key")
    shared = own.exchange(X25519PublicKey.from_public_bytes(peer.pub))
    (low_ip, low_pub), (high_ip, high_pub) = sorted(
        ((parse_ip(node.ip), node.pub), (parse_ip(peer.ip), peer.pub))
    )
    info = _BOUND_INFO + f"{low_ip}|{high_ip}|{generation.id}|".encode() + low_pub + high_pub
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=generation.key, info=info)
    return hkdf.derive(shared)


def psk_for(
    generation: Generation, node: Peer, peer: Peer, own: X25519PrivateKey | None
) -> bytes | None:
    """This node's PSK with a peer in one generation, or None if it cannot have one: a
    generation with node keys needs the peer's public key and this node's own, as the
    keyring lists it, to be the one `own` holds (else the peer would derive another)."""
    if not generation.node_keys:
        return pair_psk(generation, node.ip, peer.ip)
    if own is None or peer.pub is None or node.pub != public_bytes(own):
        return None
    return bound_pair_psk(generation, own, node, peer)


def dumps(keyring: Keyring) -> str:
    """Serialise canonically, so that equal keyrings give equal bytes."""
    doc = {
        "version": 2 if any(g.node_keys for g in keyring.generations) else 1,
        "serial": keyring.serial,
        "sent": keyring.sent,
        "generations": [_generation_doc(g) for g in keyring.generations],
        "peers": [_peer_doc(p) for p in keyring.peers],
        "encryption": {"enabled": keyring.encryption.enabled, "at": keyring.encryption.at},
        "outside": [{"name": p.name, "ip": p.ip} for p in keyring.outside],
        "sent_since": keyring.sent_since,
    }
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"


def _generation_doc(generation: Generation) -> dict[str, Any]:
    doc: dict[str, Any] = {"id": generation.id, "key": base64.b64encode(generation.key).decode()}
    if generation.node_keys:
        doc["node_keys"] = True
    return doc


def _peer_doc(peer: Peer) -> dict[str, Any]:
    doc = {"name": peer.name, "ip": peer.ip}
    if peer.pub is not None:
        doc["pub"] = base64.b64encode(peer.pub).decode()
    return doc


def too_large(size: int) -> KeyringError:
    """One wording for a keyring over the limit, whether read from a file or given whole."""
    return KeyringError(
        f"keyring is {size} bytes, over the {MAX_KEYRING_BYTES}-byte limit; "
        "republish the Secret from the master"
    )


def loads(data: bytes | str) -> Keyring:
    """Parse and validate strictly; any defect raises KeyringError with one sentence."""
    if len(data) > MAX_KEYRING_BYTES:
        raise too_large(len(data))
    if not data.strip():
        raise KeyringError("keyring is empty; wait for the master to publish the Secret")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:  # also absurd nesting and 5,000-digit ints
        raise KeyringError(
            f"keyring is not valid JSON ({exc}); the file is truncated or corrupt, "
            "republish the Secret from the master"
        ) from None
    if not isinstance(doc, dict):
        raise KeyringError("keyring must be a JSON object; republish the Secret from the master")
    version = doc.get("version")
    if version not in FORMAT_VERSIONS or isinstance(version, bool):
        raise KeyringError(
            f"keyring format version {_show(version)} is not supported "
            f"(expected 1 or {FORMAT_VERSION}); "
            "run agent and master of the same release"
        )
    serial = _integer(doc, "serial")
    generations = _generations(doc.get("generations"))
    if version == 1 and any(g.node_keys for g in generations):
        raise KeyringError("keyring format version 1 cannot hold a generation with node keys")
    sent = _integer(doc, "sent")
    if sent not in {g.id for g in generations}:
        raise KeyringError(f"sent generation {sent} is not among the keyring's generations")
    peers = _peers(doc.get("peers"), "peers")
    outside = _peers(doc.get("outside", []), "outside")
    _unique([p.name for p in peers + outside], "node name")
    _unique([p.ip for p in peers + outside], "node IP")
    encryption = _encryption(doc.get("encryption"))
    sent_since = _moment(doc.get("sent_since"), "sent_since")
    return Keyring(serial, sent, generations, peers, encryption, outside, sent_since)


def _moment(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < 1e11:
        raise KeyringError(
            f"keyring field {name!r} must be epoch seconds or null, got {_show(value)}"
        )
    return float(value)


def _encryption(raw: Any) -> Encryption:
    """Absent: on (a keyring from before the switch existed)."""
    if raw is None:
        return Encryption()
    if not isinstance(raw, dict) or not isinstance(raw.get("enabled"), bool):
        raise KeyringError(
            "keyring field 'encryption' must be an object with a boolean 'enabled'; "
            "republish the Secret from the master"
        )
    return Encryption(raw["enabled"], _moment(raw.get("at"), "encryption.at"))


def _integer(doc: dict[str, Any], name: str) -> int:
    value = doc.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise KeyringError(
            f"keyring field {name!r} must be a non-negative integer, got {_show(value)}"
        )
    return value


def _generations(raw: Any) -> tuple[Generation, ...]:
    if not isinstance(raw, list) or not raw:
        raise KeyringError("keyring must list at least one key generation")
    result: list[Generation] = []
    for item in raw:
        if not isinstance(item, dict):
            raise KeyringError("every key generation must be an object with 'id' and 'key'")
        gen_id = _integer(item, "id")
        try:
            key = base64.b64decode(item.get("key", ""), validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise KeyringError(f"key of generation {gen_id} is not valid base64") from None
        if len(key) != KEY_BYTES:
            raise KeyringError(
                f"key of generation {gen_id} is {len(key)} bytes, expected {KEY_BYTES}"
            )
        node_keys = item.get("node_keys", False)
        if not isinstance(node_keys, bool):
            raise KeyringError(f"'node_keys' of generation {gen_id} must be true or false")
        result.append(Generation(gen_id, key, node_keys))
    _unique([g.id for g in result], "generation id")
    return tuple(result)


# Node addresses parsed once: every keyring change, and every agent pass, reads the IPs of
# all pairs (parsing them was a third of a one-peer change at N=1,000). Bounded: nodes'
# addresses change rarely.
parse_ip = lru_cache(maxsize=1 << 14)(ipaddress.ip_address)


def _peers(raw: Any, field_name: str) -> tuple[Peer, ...]:
    if not isinstance(raw, list):
        raise KeyringError(f"keyring field {field_name!r} must be a list of {{name, ip}} objects")
    result: list[Peer] = []
    for item in raw:
        if not isinstance(item, dict):
            raise KeyringError(
                f"every entry of {field_name!r} must be an object with 'name' and 'ip'"
            )
        name, ip = item.get("name"), item.get("ip")
        if not is_node_name(name):
            raise KeyringError(f"peer name {_show(name)} is not a valid Kubernetes node name")
        try:
            if not isinstance(ip, str):
                raise ValueError(ip)
            address = parse_ip(ip)
        except ValueError:
            raise KeyringError(f"peer {name} has an invalid IP address {_show(ip)}") from None
        if address.version != 4:
            raise KeyringError(f"peer {name} has IPv6 address {ip}; IPIP is IPv4 only")
        result.append(Peer(name, str(address), _public_key(item.get("pub"), name)))
    return tuple(result)


def _public_key(value: Any, name: str) -> bytes | None:
    if value is None:
        return None
    raw = decode_public_key(value)
    if raw is None:
        raise KeyringError(
            f"peer {name} has a public key that is not 32 bytes of base64; "
            "republish the Secret from the master"
        )
    return raw


_SHOWN_MAX = 40
_UNSHOWN = re.compile(r"[^A-Za-z0-9._:/\\\"-]")


def _show(value: Any) -> str:
    """An offending value as an error message shows it: JSON, at most _SHOWN_MAX characters,
    anything but letters, digits and `._:/\\"-` as `?`, so that a hostile file can neither
    flood the log nor make the message read as several lines or sentences."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    try:
        text = json.dumps(value)
    except ValueError:  # an integer too long for str()
        return "a huge number"
    if len(text) > _SHOWN_MAX:
        text = text[: _SHOWN_MAX - 3] + "..."
    return _UNSHOWN.sub("?", text)


def _unique(values: list[Any], what: str) -> None:
    seen: set[Any] = set()
    for value in values:
        if value in seen:
            raise KeyringError(f"duplicate {what} {value} in keyring")
        seen.add(value)


def create(
    peers: list[Peer],
    serial: int = 1,
    generation_id: int = 1,
    encryption: Encryption = Encryption(),
    outside: tuple[Peer, ...] = (),
    node_keys: bool = False,
) -> Keyring:
    """A keyring with one fresh generation, sent: the start of a mesh."""
    key = Generation(generation_id, new_generation_key(), node_keys)
    return Keyring(serial, generation_id, (key,), tuple(peers), encryption, outside)
