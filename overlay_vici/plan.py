"""Plan the VICI commands that move charon from what it holds to what it should hold.

Pure. charon reports only the names of loaded connections and ids of shared keys, so
content changes are tracked by the digest of the message last sent to *this* charon
instance; the agent forgets those digests when charon restarts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from overlay_vici.render import is_owned_conn, is_owned_secret
from overlay_vici.swanctl_conf import Messages


@dataclass(frozen=True)
class Command:
    """One VICI request; `subject` names the connection or key id (never key material)."""

    command: str
    message: dict[str, Any]
    subject: str


def digest(message: dict[str, Any]) -> str:
    return hashlib.sha256(repr(message).encode()).hexdigest()


def plan(
    desired: Messages,
    loaded_conns: set[str],
    loaded_shared: set[str],
    sent: dict[str, str],
) -> list[Command]:
    """Keys first (a new connection must find its key), removals last (never a gap)."""
    commands = [
        Command("load-shared", message, key_id)
        for key_id, message in desired.shared.items()
        if key_id not in loaded_shared or sent.get(key_id) != digest(message)
    ]
    commands += [
        Command("load-conn", message, name)
        for name, message in desired.conns.items()
        if name not in loaded_conns or sent.get(name) != digest(message)
    ]
    commands += [
        Command("unload-conn", {"name": name}, name)
        for name in sorted(loaded_conns)
        if is_owned_conn(name) and name not in desired.conns
    ]
    commands += [
        Command("unload-shared", {"id": key_id}, key_id)
        for key_id in sorted(loaded_shared)
        if is_owned_secret(key_id) and key_id not in desired.shared
    ]
    return commands
