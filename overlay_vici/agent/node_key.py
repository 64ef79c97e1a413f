"""This node's X25519 private key on disk: made once from the CSPRNG, kept across agent and
charon restarts (a new key costs the node its pairs until the master has published the new
public key to every peer), never sent anywhere. Only its public key leaves the node, in the
agent's status report.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from overlay_vici.core.files import write_atomic
from overlay_vici.core.keyring import KEY_BYTES, new_node_key

DEFAULT_PATH = Path("/var/lib/overlay-vici/node.key")


class NodeKeyError(ValueError):
    """The node key file cannot be used; one sentence that says what to fix."""


def read(path: Path) -> X25519PrivateKey | None:
    """The key in `path`, or None if there is no file yet."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise NodeKeyError(
            f"cannot read the node key {path} ({exc}); fix its permissions, or delete it to "
            "have the agent make a new one"
        ) from None
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != KEY_BYTES:
        raise NodeKeyError(
            f"the node key {path} is not {KEY_BYTES} bytes of base64; delete it to have the "
            "agent make a new one (this node's pairs wait until the master publishes it)"
        )
    return X25519PrivateKey.from_private_bytes(raw)


def load_or_create(path: Path) -> tuple[X25519PrivateKey, bool]:
    """This node's key and whether it was made now. The file is mode 0600 in a 0700
    directory, written atomically: a crash leaves the old key or the new, never half."""
    existing = read(path)
    if existing is not None:
        return existing, False
    key = new_node_key()
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        write_atomic(path, base64.b64encode(key.private_bytes_raw()).decode() + "\n", 0o600)
    except OSError as exc:
        raise NodeKeyError(
            f"cannot write the node key {path} ({exc.strerror}); give the agent a writable, "
            "node-local directory there (the manifest's hostPath /var/lib/overlay-vici) or "
            "another --node-key"
        ) from None
    return key, True
