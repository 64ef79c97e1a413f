"""Keyrings of any size for the host-side tests, built deterministically."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from overlay_vici.core.keyring import Generation, Keyring, Peer

MakeKeyring = Callable[..., Keyring]


def node_name(index: int) -> str:
    return f"node-{index}"


def node_ip(index: int) -> str:
    return f"10.{index // 62500}.{index // 250 % 250}.{index % 250 + 1}"


def build_keyring(
    peers: int | Sequence[int] = 4,
    generations: Sequence[int] = (1, 2),
    sent: int | None = None,
    serial: int = 1,
) -> Keyring:
    """A valid keyring: nodes `node-<i>` at distinct 10/8 addresses, fixed per-generation keys.

    `peers` is a count (nodes 0..n-1) or the explicit node indexes, so that a test can add
    or remove one node and keep every other node identical.
    """
    indexes = range(peers) if isinstance(peers, int) else peers
    return Keyring(
        serial=serial,
        sent=generations[0] if sent is None else sent,
        generations=tuple(
            Generation(g, hashlib.sha256(f"generation {g}".encode()).digest()) for g in generations
        ),
        peers=tuple(Peer(node_name(i), node_ip(i)) for i in indexes),
    )
