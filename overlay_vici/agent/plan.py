"""Plan the VICI commands that move charon from what it holds to what it should hold.

Pure. charon reports only the names of loaded connections and ids of shared keys, so
content changes are tracked by the digest of the message last sent to *this* charon
instance; the agent forgets those digests when charon restarts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from overlay_vici.agent.render import is_owned_conn, is_owned_secret
from overlay_vici.agent.swanctl_conf import Messages


@dataclass(frozen=True)
class Command:
    """One VICI request; `subject` names the connection or key id (never key material)."""

    command: str
    message: dict[str, Any]
    subject: str
    # charon refuses some harmless requests, e.g. terminating an SA that is already gone.
    must_succeed: bool = True
    # For loads: the digest to remember once charon accepted the message.
    digest: str | None = None


@dataclass(frozen=True)
class Desired:
    """What charon should hold, with each message's digest computed once, not every pass."""

    messages: Messages
    digests: dict[str, str]
    # Connections to bring up as soon as they are loaded (upkeep.SaUpkeep paces them).
    initiated: frozenset[str]
    # Unload connections but leave their SAs to the caller (the switch off: see agent).
    keep_sas: bool = False

    @classmethod
    def of(
        cls,
        messages: Messages,
        initiated: frozenset[str] = frozenset(),
        keep_sas: bool = False,
        digests: dict[str, str] | None = None,
    ) -> Desired:
        """`digests`: those of `messages`, if already known (conf_parts keeps them)."""
        if digests is None:
            every = {**messages.shared, **messages.conns}
            digests = {subject: digest(message) for subject, message in every.items()}
        return cls(messages, digests, initiated, keep_sas)


def digest(message: dict[str, Any]) -> str:
    return hashlib.sha256(repr(message).encode()).hexdigest()


def child_name(conn: str, load_conn: dict[str, Any] | None) -> str:
    """The CHILD_SA a connection's load-conn message defines ("" if none)."""
    return next(iter(load_conn[conn].get("children", {})), "") if load_conn else ""


def initiate_message(conn: str, child: str) -> dict[str, Any]:
    """Bring a connection up in the background (timeout -1: `initiate` returns at once);
    the trap stays as the safety net."""
    return {"ike": conn, "child": child, "timeout": "-1", "init-limits": "no"}


def _terminate(conn: str) -> dict[str, Any]:
    """Delete without waiting on a peer that is likely gone."""
    return {"ike": conn, "force": "yes", "timeout": "-1"}


def plan(
    desired: Desired,
    loaded_conns: set[str],
    loaded_shared: set[str],
    sent: dict[str, str],
) -> list[Command]:
    """Keys first (a new connection must find its key), removals last (never a gap)."""
    commands = [
        Command(name, message, subject, digest=desired.digests[subject])
        for name, messages, loaded in (
            ("load-shared", desired.messages.shared, loaded_shared),
            ("load-conn", desired.messages.conns, loaded_conns),
        )
        for subject, message in messages.items()
        if subject not in loaded or sent.get(subject) != desired.digests[subject]
    ]
    for name in sorted(loaded_conns):
        if is_owned_conn(name) and name not in desired.messages.conns:
            # Unloading removes the trap only; the peer's SAs would live on until DPD.
            commands.append(Command("unload-conn", {"name": name}, name))
            if not desired.keep_sas:
                commands.append(Command("terminate", _terminate(name), name, must_succeed=False))
    commands += [
        Command("unload-shared", {"id": key_id}, key_id)
        for key_id in sorted(loaded_shared)
        if is_owned_secret(key_id) and key_id not in desired.messages.shared
    ]
    return commands
