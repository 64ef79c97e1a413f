"""The planner sends only the difference between what charon holds and what it should hold."""

from __future__ import annotations

from functools import cache

from keyring_fixtures import build_keyring

from overlay_vici.agent.plan import Command, Desired, digest, plan
from overlay_vici.agent.render import Settings, conn_name, secret_id, swanctl_conf
from overlay_vici.agent.swanctl_conf import Messages, to_messages

NODE = "node-0"


@cache
def desired(peers: int | tuple[int, ...], sent: int = 1, dpd: str = "30s") -> Desired:
    """What node-0 should load for a keyring of `peers` (count or node indexes)."""
    keyring = build_keyring(peers, generations=(1, 2), sent=sent)
    return Desired.of(to_messages(swanctl_conf(keyring, NODE, Settings(dpd_delay=dpd))))


def in_sync(target: Desired) -> tuple[set[str], set[str], dict[str, str]]:
    """What charon holds, and the digests the agent remembers, after loading `target`."""
    messages = target.messages
    return set(messages.conns), set(messages.shared), dict(target.digests)


def kinds(commands: list[Command]) -> list[tuple[str, str]]:
    return [(c.command, c.subject) for c in commands]


def test_nothing_to_do_when_in_sync() -> None:
    """Charon already holding every message with matching digests gives an empty plan."""
    messages = desired(50)
    assert plan(messages, *in_sync(messages)) == []


def test_everything_loaded_into_an_empty_charon() -> None:
    """A fresh charon gets every key and every connection, nothing unloaded."""
    messages = desired(4)
    commands = plan(messages, set(), set(), {})
    assert [c.command for c in commands] == ["load-shared"] * 6 + ["load-conn"] * 3


def test_adding_one_peer_among_a_thousand_sends_only_that_peer() -> None:
    """One new node costs its 2 keys and 1 connection, whatever the mesh size."""
    old, new = desired(1000), desired(1001)
    commands = plan(new, *in_sync(old))
    assert kinds(commands) == [
        ("load-shared", secret_id("node-1000", 1)),
        ("load-shared", secret_id("node-1000", 2)),
        ("load-conn", conn_name("node-1000")),
    ]
    assert commands[2].message == new.messages.conns[conn_name("node-1000")]
    assert commands[2].digest == digest(commands[2].message)
    assert len(plan(desired(11), *in_sync(desired(10)))) == len(commands)


def test_removing_a_peer_unloads_its_connection_and_keys() -> None:
    """A node gone from the keyring: unload-conn (+ terminate), unload-shared per generation."""
    without_7 = tuple(i for i in range(20) if i != 7)
    commands = plan(desired(without_7), *in_sync(desired(20)))
    assert kinds(commands) == [
        ("unload-conn", conn_name("node-7")),
        ("terminate", conn_name("node-7")),
        ("unload-shared", secret_id("node-7", 1)),
        ("unload-shared", secret_id("node-7", 2)),
    ]
    assert commands[0].message == {"name": "ov-node-7"}
    assert commands[2].message == {"id": secret_id("node-7", 1)}
    assert all(c.must_succeed for c in commands if c.command != "terminate")


def test_removed_peer_sas_are_terminated_without_waiting() -> None:
    """After unload-conn, its IKE_SA is force-terminated at once; failure there is harmless."""
    commands = plan(desired(3), *in_sync(desired(4)))
    (terminate,) = [c for c in commands if c.command == "terminate"]
    assert terminate.message == {"ike": "ov-node-3", "force": "yes", "timeout": "-1"}
    assert terminate.must_succeed is False
    assert commands.index(terminate) == 1 + [c.command for c in commands].index("unload-conn")


def test_switching_off_unloads_everything_but_leaves_the_sas_to_the_agent() -> None:
    """keep_sas: connections and keys go, no terminate (the agent closes the SAs once every
    node's traps are gone)."""
    off = Desired.of(Messages({}, {}), keep_sas=True)
    commands = plan(off, *in_sync(desired(3)))
    assert {c.command for c in commands} == {"unload-conn", "unload-shared"}
    assert len(commands) == 2 + 2 * 2  # two peers' conns, their keys of generations 1 and 2


def test_changed_content_is_reloaded_by_digest() -> None:
    """Same names, different content (a setting changed): every connection, no key, reloads."""
    commands = plan(desired(10, dpd="10s"), *in_sync(desired(10)))
    assert {c.command for c in commands} == {"load-conn"}
    assert len(commands) == 9


def test_switching_the_sent_generation_reloads_keys_and_connections() -> None:
    """New owners on both generations' keys, and a connection config charon will not reuse
    the stale IKE_SAs for (render.ike_rand_time): every message again, nothing unloaded."""
    commands = plan(desired(10, sent=2), *in_sync(desired(10, sent=1)))
    assert sorted(c.command for c in commands) == ["load-conn"] * 9 + ["load-shared"] * 18


def test_one_changed_message_among_many_is_the_only_one_reloaded() -> None:
    """A single stale digest reloads just that message."""
    messages = desired(30)
    conns, keys, sent = in_sync(messages)
    sent[conn_name("node-5")] = "stale"
    sent[secret_id("node-9", 2)] = "stale"
    assert kinds(plan(messages, conns, keys, sent)) == [
        ("load-shared", secret_id("node-9", 2)),
        ("load-conn", conn_name("node-5")),
    ]


def test_forgotten_digests_reload_everything() -> None:
    """After charon restarts the agent clears its digests: all is resent even if names match."""
    messages = desired(5)
    conns, keys, _ = in_sync(messages)
    assert len(plan(messages, conns, keys, {})) == len(messages.digests) == 5 * 3 - 3


def test_missing_from_charon_is_reloaded_even_with_a_remembered_digest() -> None:
    """Someone unloaded a conn behind the agent's back: the name check catches it."""
    messages = desired(5)
    conns, keys, sent = in_sync(messages)
    conns.discard(conn_name("node-3"))
    keys.discard(secret_id("node-4", 1))
    assert kinds(plan(messages, conns, keys, sent)) == [
        ("load-shared", secret_id("node-4", 1)),
        ("load-conn", conn_name("node-3")),
    ]


def test_operator_owned_connections_and_keys_are_never_unloaded() -> None:
    """Only `ov-` connections and `ike-ov-` keys are the agent's; others stay loaded."""
    messages = desired(3)
    conns, keys, sent = in_sync(messages)
    conns |= {"site-to-site", "ovx", "my-ov-vpn", "OV-upper"}
    keys |= {"ike-site", "ike-ovx", "eap-ov-user", "ov-node-1"}
    assert plan(messages, conns, keys, sent) == []
    conns.add("ov-stale")
    keys.add("ike-ov-stale-g1")
    assert kinds(plan(messages, conns, keys, sent)) == [
        ("unload-conn", "ov-stale"),
        ("terminate", "ov-stale"),
        ("unload-shared", "ike-ov-stale-g1"),
    ]


def test_order_is_keys_then_conns_then_unloads() -> None:
    """Keys before connections (a new conn finds its key), removals last (never a gap)."""
    old = desired(tuple(range(0, 8)))
    new = desired((0, *range(3, 12)), sent=2)
    commands = plan(new, *in_sync(old))
    order = {"load-shared": 0, "load-conn": 1, "unload-conn": 2, "terminate": 2}
    ranks = [order.get(c.command, 3) for c in commands]
    assert ranks == sorted(ranks)
    assert set(ranks) == {0, 1, 2, 3}
    assert commands[-1].command == "unload-shared"
    assert [c.subject for c in commands if c.command == "unload-conn"] == [
        conn_name(f"node-{i}") for i in (1, 2)
    ]


def test_subjects_name_things_and_never_carry_key_material() -> None:
    """A command's subject is the conn name or key id, safe to log."""
    messages = desired(3)
    for command in plan(messages, set(), set(), {}):
        assert command.subject in messages.digests
        assert command.subject.startswith(("ov-", "ike-ov-"))


def test_digest_is_stable_and_content_sensitive() -> None:
    """Equal messages share a digest; any change in content or owners changes it."""
    a = {"id": "k", "type": "ike", "data": b"\x01", "owners": ["10.0.0.1", "10.0.0.2"]}
    assert digest(a) == digest(dict(a))
    assert digest(a) != digest({**a, "data": b"\x02"})
    assert digest(a) != digest({**a, "owners": ["10.0.0.2"]})


def test_desired_digests_cover_every_message_once() -> None:
    """Desired.of digests each load-shared and load-conn message, keyed by id or name."""
    target = desired(4)
    every = {**target.messages.shared, **target.messages.conns}
    assert target.digests == {subject: digest(message) for subject, message in every.items()}
