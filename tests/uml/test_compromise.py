"""A stolen node's secrets against the other pairs, on real charons in the UML guest.

The attacker holds everything one node has: its private key (node.key) and the mounted
keyring (every generation's root key and every node's public key). With them it runs
charon at another node's address and tries to authenticate as that node to a third. Each
key it can compute must fail at the victim with AUTHENTICATION_FAILED; the same harness
with the impersonated node's own private key must succeed, so that the failures are the
keys' doing and not the harness's.
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import vici
from cluster import LocalMaster, wait_for
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from faultbed import Bed, all_pairs_encrypted, bed_of, ike_spis, session
from mesh import Node

from overlay_vici.agent import node_key
from overlay_vici.agent.render import Settings, strongswan_conf, swanctl_conf
from overlay_vici.agent.secret import read_keyring
from overlay_vici.agent.swanctl_conf import to_messages
from overlay_vici.core import keyring as kr
from overlay_vici.core.contract import conn_name

MAC_MISMATCH = "but MAC mismatched"
# What n2 tries for a peer claiming to be n1: that pair's key of each generation, no other.
PAIR_KEYS_ONLY = "tried 1 shared key for '10.99.0.2' - '10.99.0.1', but MAC mismatched"
AUTH_FAILED = "received AUTHENTICATION_FAILED notify error"


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[Bed]:
    with bed_of(tmp_path) as made:
        yield made


def stolen(node: Node) -> tuple[kr.Keyring, X25519PrivateKey]:
    """What root on `node` reads: its mounted keyring and its node key file."""
    own = node_key.read(node.dir / "node.key")
    assert own is not None, f"{node.name} has no node key"
    return read_keyring(LocalMaster.keys(node)), own


def attempt(site: Node, keyring: kr.Keyring, me: kr.Peer, victim: kr.Peer, psk: bytes) -> bool:
    """On the charon at `site` (whose address is `me`'s), load the connection `me`'s agent
    would to `victim`, with `psk` as the key it authenticates with; initiate. True if the
    IKE_SA came up."""
    # Rendered as a generation without node keys (so that it needs no private key), then
    # the key it authenticates with replaced by `psk`.
    sent = dataclasses.replace(keyring.generation(keyring.sent), node_keys=False)
    view = dataclasses.replace(keyring, generations=(sent,), peers=(me, victim), outside=())
    messages = to_messages(swanctl_conf(view, me.name, Settings()))
    with session(site) as s:
        for message in messages.shared.values():
            s.load_shared({**message, "data": psk})
        for message in messages.conns.values():
            s.load_conn(message)
        try:
            list(s.initiate({"ike": conn_name(victim.name), "child": "ipip", "timeout": "20000"}))
        except vici.exception.CommandException:
            return False
    return True


def log_since(path: Path, offset: int) -> str:
    return path.read_bytes()[offset:].decode(errors="replace")


def test_a_stolen_nodes_keys_cannot_authenticate_as_another_node(bed: Bed) -> None:
    """n4 is compromised. Its key material cannot make n2 accept an IKE_SA from n1's address
    as n1; n1's own key can. n4's own pairs keep working throughout."""
    n1, n2, n3, n4 = bed.mesh.nodes
    keyring, n4_key = stolen(n4)
    sent = keyring.generation(keyring.sent)
    assert sent.node_keys, "the master's generation binds PSKs to node keys"
    assert all(p.pub for p in keyring.peers), "every node's public key is published"
    me, victim, thief = (keyring.peer(n.name) for n in (n1, n2, n4))
    assert me and victim and thief

    # Everything n4 can compute that might pass for the pair (n1, n2)'s key.
    candidates = {
        # what a stolen keyring gave before node keys: the root key alone
        "root key only (pair_psk)": kr.pair_psk(sent, me.ip, victim.ip),
        # n4's own key in n1's place, with n1's published public key in the binding
        "n4's private key as n1": kr.bound_pair_psk(sent, n4_key, me, victim),
        # n4's genuine key with n2 (valid for the pair n4-n2, not n1-n2)
        "n4's own PSK with n2": kr.bound_pair_psk(sent, n4_key, thief, victim),
    }

    # The attacker owns n1's address: n1's agent and charon give way to its charon.
    bed.cluster.agents[n1.name].kill()
    n1.stop_charon(signal.SIGTERM)
    n1.start_charon(strongswan_conf(str(n1.vici_socket), str(n1.charon_log)))
    n1.wait_vici()

    outcomes: dict[str, tuple[bool, bool, bool]] = {}
    for label, psk in candidates.items():
        at_victim, at_site = n2.charon_log.stat().st_size, n1.charon_log.stat().st_size
        up = attempt(n1, keyring, me, victim, psk)
        if not up:
            wait_for(
                f"{label}: n2's verdict in its log",
                lambda: MAC_MISMATCH in log_since(n2.charon_log, at_victim),  # noqa: B023
                timeout=10,
            )
        outcomes[label] = (
            up,
            PAIR_KEYS_ONLY in log_since(n2.charon_log, at_victim),
            AUTH_FAILED in log_since(n1.charon_log, at_site),
        )
    print(f"\nCOMPROMISE {outcomes}")
    for label, (up, mismatched, refused) in outcomes.items():
        assert not up, f"{label}: authenticated as n1 to n2"
        assert mismatched and refused, f"{label}: not an AUTHENTICATION_FAILED ({outcomes})"

    # Control: the same harness with n1's own private key is accepted.
    n1_key = node_key.read(n1.dir / "node.key")
    assert n1_key is not None
    assert attempt(n1, keyring, me, victim, kr.bound_pair_psk(sent, n1_key, me, victim))
    assert ike_spis(n2, conn_name(n1.name)), "n2 holds the control's IKE_SA"

    # n4's own pairs are untouched by all this.
    assert all_pairs_encrypted([n2, n3, n4])
