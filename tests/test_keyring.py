"""The keyring contract: canonical round trip, the per-pair KDF and strict validation."""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from keyring_fixtures import build_keyring

from overlay_vici.core import keyring as kr
from overlay_vici.core.keyring import Generation, KeyringError, Peer, dumps, loads, pair_psk


def valid_doc() -> dict[str, Any]:
    return json.loads(dumps(build_keyring(3, generations=(1, 2), sent=2, serial=7)))


def assert_one_sentence(message: str) -> None:
    assert message, "empty error message"
    assert "\n" not in message, f"multi-line error: {message!r}"
    assert not re.search(r"[.!?]\s+[A-Z]", message), f"more than one sentence: {message!r}"
    assert not message.rstrip().endswith(("(", ",", ";")), message
    # A hostile file must not flood the log through the message that rejects it.
    assert len(message) <= 300, f"{len(message)}-character error: {message[:120]!r}..."


# --- round trip --------------------------------------------------------------------------


def test_round_trip_is_identity_and_canonical() -> None:
    """loads(dumps(k)) == k, and dumping again gives the very same bytes."""
    keyring = build_keyring(5, generations=(3, 4, 9), sent=4, serial=12)
    text = dumps(keyring)
    assert loads(text) == keyring
    assert loads(text.encode()) == keyring
    assert dumps(loads(text)) == text


def test_the_switch_moment_round_trips_and_is_validated() -> None:
    keyring = dataclasses.replace(build_keyring(3, generations=(1, 2), sent=2), sent_since=1.5e9)
    assert loads(dumps(keyring)).sent_since == 1.5e9
    assert loads(json.dumps({**valid_doc(), "sent_since": None})).sent_since is None
    with pytest.raises(KeyringError, match="'sent_since' must be epoch seconds or null"):
        loads(json.dumps({**valid_doc(), "sent_since": "yesterday"}))


def test_dumps_is_independent_of_field_order_in_the_input() -> None:
    """Two documents differing only in key order and whitespace load to equal keyrings."""
    doc = valid_doc()
    shuffled = json.dumps(dict(reversed(list(doc.items()))), indent=None)
    assert dumps(loads(shuffled)) == dumps(loads(json.dumps(doc)))


def test_accepted_excludes_the_sent_generation() -> None:
    """`accepted` lists every generation but the sent one; `peer` finds by name."""
    keyring = build_keyring(2, generations=(1, 2, 3), sent=2)
    assert keyring.accepted == (1, 3)
    assert keyring.peer("node-1") == Peer("node-1", "10.0.0.2")
    assert keyring.peer("absent") is None


def test_keyring_without_switch_or_outside_loads_as_encrypted_with_nobody_outside() -> None:
    """A keyring from before the switch existed means: on since ever, every node in the mesh."""
    doc = valid_doc()
    del doc["encryption"], doc["outside"]
    keyring = loads(json.dumps(doc))
    assert keyring.encryption == kr.Encryption(True, 0.0)
    assert keyring.encryption.mode(now=1e9) == "on"
    assert keyring.outside == ()


@pytest.mark.parametrize(
    ("enabled", "at", "now", "mode"),
    [
        (True, None, 100.0, "prepare"),  # enable announced, not scheduled: get ready only
        (True, 200.0, 100.0, "prepare"),
        (True, 200.0, 200.0, "on"),
        (False, None, 100.0, "on"),  # disable announced: keep encrypting until the moment
        (False, 200.0, 199.9, "on"),
        (False, 200.0, 200.0, "off"),
    ],
)
def test_switch_takes_effect_at_its_moment(
    enabled: bool, at: float | None, now: float, mode: str
) -> None:
    """Every agent derives the same mode from the keyring and the clock."""
    switch = kr.Encryption(enabled, at)
    assert switch.mode(now) == mode
    assert switch.wait(now) == (at - now if at is not None and at > now else None)


# --- the per-pair key --------------------------------------------------------------------


def test_pair_psk_is_symmetric_and_32_bytes() -> None:
    """Both ends of a pair derive the same 32-byte key whatever the argument order."""
    gen = Generation(1, bytes(range(32)))
    assert pair_psk(gen, "10.0.0.1", "10.0.0.2") == pair_psk(gen, "10.0.0.2", "10.0.0.1")
    assert len(pair_psk(gen, "10.0.0.1", "10.0.0.2")) == kr.KEY_BYTES == 32


def test_pair_psk_sorts_addresses_numerically() -> None:
    """Order is by address value, not text: 10.0.0.9 < 10.0.0.10 on both ends."""
    gen = Generation(1, bytes(32))
    assert pair_psk(gen, "10.0.0.9", "10.0.0.10") == pair_psk(gen, "10.0.0.10", "10.0.0.9")


def test_pair_psk_differs_across_pairs_generations_and_root_keys() -> None:
    """Every pair, generation id and root key gives a distinct key."""
    ips = [f"10.0.0.{i}" for i in range(1, 9)]
    gen_a, gen_b = Generation(1, bytes(32)), Generation(2, bytes(32))
    other_root = Generation(1, b"\x01" * 32)
    keys = [
        pair_psk(gen, a, b)
        for gen in (gen_a, gen_b, other_root)
        for i, a in enumerate(ips)
        for b in ips[i + 1 :]
    ]
    assert len(set(keys)) == len(keys) == 3 * 28


def test_create_uses_fresh_random_keys() -> None:
    """create() starts a mesh with one sent generation holding a new 32-byte CSPRNG key."""
    peers = [Peer("a", "10.0.0.1"), Peer("b", "10.0.0.2")]
    made = [kr.create(peers, serial=5, generation_id=3) for _ in range(20)]
    assert {len(k.generations) for k in made} == {1}
    assert {(k.serial, k.sent, k.generations[0].id) for k in made} == {(5, 3, 3)}
    assert all(len(k.generations[0].key) == 32 for k in made)
    assert len({k.generations[0].key for k in made}) == 20
    assert loads(dumps(made[0])) == made[0]


def test_create_draws_from_the_os_csprng(monkeypatch: pytest.MonkeyPatch) -> None:
    """The root key is what secrets.token_bytes(32) returns, not something derived."""
    calls: list[int] = []

    def fake_token_bytes(n: int) -> bytes:
        calls.append(n)
        return b"\x42" * n

    monkeypatch.setattr(kr.secrets, "token_bytes", fake_token_bytes)
    assert kr.create([Peer("a", "10.0.0.1")]).generations[0].key == b"\x42" * 32
    assert calls == [32]


# --- strict validation -------------------------------------------------------------------


def _mutated(mutate: Any) -> str:
    doc = valid_doc()
    mutate(doc)
    return json.dumps(doc)


def _set(path: str, value: Any) -> Any:
    def apply(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = doc
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        target[int(last) if last.isdigit() else last] = value

    return apply


def _drop(name: str) -> Any:
    return lambda doc: doc.pop(name)


INVALID: dict[str, tuple[bytes | str | Any, str]] = {
    "unknown version": (_set("version", 3), "format version 3 is not supported"),
    "missing version": (_drop("version"), "format version null is not supported"),
    "bad base64": (
        _set("generations.0.key", "not*base64"),
        "key of generation 1 is not valid base64",
    ),
    "key not a string": (_set("generations.0.key", 12), "key of generation 1 is not valid base64"),
    "short key": (
        _set("generations.0.key", base64.b64encode(bytes(16)).decode()),
        "key of generation 1 is 16 bytes, expected 32",
    ),
    "long key": (
        _set("generations.1.key", base64.b64encode(bytes(33)).decode()),
        "key of generation 2 is 33 bytes, expected 32",
    ),
    "duplicate peer names": (_set("peers.1.name", "node-0"), "duplicate node name node-0"),
    "duplicate IPs": (_set("peers.2.ip", "10.0.0.1"), "duplicate node IP 10.0.0.1"),
    "IP with a leading zero": (
        _set("peers.2.ip", "10.0.0.01"),
        'peer node-2 has an invalid IP address "10.0.0.01"',
    ),
    "invalid IP": (_set("peers.0.ip", "10.0.0.256"), "peer node-0 has an invalid IP address"),
    "missing IP": (_set("peers.0.ip", None), "peer node-0 has an invalid IP address null"),
    "IPv6": (_set("peers.1.ip", "fd00::1"), "peer node-1 has IPv6 address fd00::1"),
    "invalid node name": (_set("peers.0.name", "Node_0"), 'peer name "Node_0" is not a valid'),
    "node name too long": (_set("peers.0.name", "a" * 254), "is not a valid Kubernetes node name"),
    "peer not an object": (_set("peers.0", "node-0"), "every entry of 'peers' must be an object"),
    "peers not a list": (_set("peers", {}), "'peers' must be a list"),
    "peers missing": (_drop("peers"), "'peers' must be a list"),
    "encryption not an object": (_set("encryption", "on"), "'encryption' must be an object"),
    "encryption without enabled": (_set("encryption.enabled", "yes"), "a boolean 'enabled'"),
    "switch moment not a number": (
        _set("encryption.at", "soon"),
        "'encryption.at' must be epoch seconds or null, got \"soon\"",
    ),
    "outside not a list": (_set("outside", "node-9"), "'outside' must be a list"),
    "outside node also a peer": (
        _set("outside", [{"name": "node-0", "ip": "10.9.9.9"}]),
        ("duplicate node name node-0"),
    ),
    "outside IP also a peer's": (
        _set("outside", [{"name": "x", "ip": "10.0.0.1"}]),
        ("duplicate node IP 10.0.0.1"),
    ),
    "no generations": (_set("generations", []), "at least one key generation"),
    "generation not an object": (_set("generations.0", 1), "every key generation must be"),
    "duplicate generation ids": (_set("generations.1.id", 1), "duplicate generation id 1"),
    "negative serial": (_set("serial", -1), "'serial' must be a non-negative integer, got -1"),
    "boolean serial": (_set("serial", True), "'serial' must be a non-negative integer, got true"),
    "string sent": (_set("sent", "2"), "'sent' must be a non-negative integer, got \"2\""),
    "sent generation missing": (_set("sent", 3), "sent generation 3 is not among"),
    "empty file": (b"", "keyring is empty"),
    "whitespace only": ("  \n\t\n", "keyring is empty"),
    "truncated JSON": ("TRUNCATED", "keyring is not valid JSON"),
    "not UTF-8": (b'{"version": "\xff"}', "keyring is not valid JSON"),
    "array": ("[]", "keyring must be a JSON object"),
    "number": ("42", "keyring must be a JSON object"),
    "string": ('"keyring"', "keyring must be a JSON object"),
    "null": ("null", "keyring must be a JSON object"),
    "over-size": ("OVERSIZE", "over the 1048576-byte limit"),
}


def _data(spec: Any) -> bytes | str:
    if spec == "TRUNCATED":
        text = json.dumps(valid_doc())
        return text[: len(text) // 2]
    if spec == "OVERSIZE":
        return json.dumps(valid_doc()) + " " * kr.MAX_KEYRING_BYTES
    if callable(spec):
        return _mutated(spec)
    return spec


@pytest.mark.parametrize("case", list(INVALID), ids=list(INVALID))
def test_invalid_keyring_raises_one_sentence_naming_the_problem(case: str) -> None:
    """Every defect gives KeyringError whose one-sentence message names what is wrong."""
    spec, expected = INVALID[case]
    with pytest.raises(KeyringError) as info:
        loads(_data(spec))
    assert expected in str(info.value)
    assert_one_sentence(str(info.value))


def test_size_limit_is_inclusive_of_exactly_one_mebibyte() -> None:
    """A document of exactly MAX_KEYRING_BYTES loads; one byte more is refused."""
    text = json.dumps(valid_doc())
    padded = text + " " * (kr.MAX_KEYRING_BYTES - len(text))
    assert len(padded) == kr.MAX_KEYRING_BYTES
    assert loads(padded) == loads(text)
    with pytest.raises(KeyringError, match="over the"):
        loads(padded + " ")


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    """Extra fields a newer master might add do not break an agent of the same version."""
    doc = valid_doc()
    doc["comment"] = "added later"
    doc["peers"][0]["zone"] = "a"
    assert loads(json.dumps(doc)) == loads(json.dumps(valid_doc()))


# Product bugs: loads() promises "any defect raises KeyringError", and the agent only catches
# KeyringError, so any other exception kills the agent's loop (see test_agent_host).


def test_deeply_nested_json_raises_keyring_error() -> None:
    """BUG: json.loads raises RecursionError on deep nesting; it must become KeyringError."""
    with pytest.raises(KeyringError):
        loads("[" * 100_000)


def test_huge_integer_raises_keyring_error() -> None:
    """BUG: an integer over Python's 4300-digit limit raises a bare ValueError from json."""
    with pytest.raises(KeyringError):
        loads('{"version": 1, "serial": ' + "9" * 5000 + "}")


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("peers.0.name", "n" * 500_000),  # a hostile file must not flood the log
        ("peers.0.ip", "Kill it. Now!\nsecond line"),
        ("version", {"! A": None}),  # found by the fuzzer: read as two sentences
        ("serial", "1. Then"),
    ],
    ids=["huge name", "sentences in an IP", "object as version", "sentence as serial"],
)
def test_offending_values_are_shown_short_on_one_line(path: str, value: Any) -> None:
    with pytest.raises(KeyringError) as raised:
        loads(_mutated(_set(path, value)))
    assert_one_sentence(str(raised.value))


def test_node_name_with_trailing_newline_is_rejected() -> None:
    """BUG: `$` in _NODE_NAME matches before a final newline, so 'node-0\\n' passes."""
    with pytest.raises(KeyringError, match="not a valid Kubernetes node name"):
        loads(_mutated(_set("peers.0.name", "node-0\n")))


# --- fuzzing -----------------------------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["10.0.0.1", "fd00::1", "node-0", base64.b64encode(bytes(32)).decode()]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


def _check_loads(data: bytes | str) -> None:
    try:
        result = loads(data)
    except KeyringError as exc:
        assert_one_sentence(str(exc))
    else:
        assert isinstance(result, kr.Keyring)


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_arbitrary_bytes_only_raise_keyring_error(data: bytes) -> None:
    """Random bytes either load or raise KeyringError, never another exception."""
    _check_loads(data)


@FUZZ
@given(json_values)
def test_fuzz_arbitrary_json_only_raises_keyring_error(value: Any) -> None:
    """Any JSON document, as text and as bytes, loads or raises KeyringError only."""
    text = json.dumps(value)
    _check_loads(text)
    _check_loads(text.encode())


@FUZZ
@given(st.data())
def test_fuzz_corrupted_fields_only_raise_keyring_error(data: st.DataObject) -> None:
    """A valid keyring with any of its fields replaced by arbitrary JSON is still handled."""
    doc = valid_doc()
    paths = [
        "version", "serial", "sent", "generations", "peers",
        "generations.0", "generations.0.id", "generations.0.key", "generations.1.key",
        "peers.0", "peers.0.name", "peers.0.ip", "peers.2.ip", "peers.1.name",
    ]  # fmt: skip
    for path in data.draw(st.lists(st.sampled_from(paths), min_size=1, max_size=3)):
        mutated = copy.deepcopy(doc)
        try:
            _set(path, data.draw(json_values))(mutated)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed the parent
        doc = mutated
    _check_loads(json.dumps(doc))


# --- node keys ---------------------------------------------------------------------------


def node_keys_ring(count: int) -> tuple[kr.Keyring, list[kr.X25519PrivateKey]]:
    """A keyring whose generation binds PSKs to node keys, and every node's private key."""
    keys = [kr.new_node_key() for _ in range(count)]
    peers = [Peer(f"n{i}", f"10.0.0.{i + 1}", kr.public_bytes(k)) for i, k in enumerate(keys)]
    return kr.create(peers, node_keys=True), keys


def test_a_bound_psk_is_the_same_at_both_ends_and_only_there() -> None:
    """Both ends of a pair derive one key; a third node's private key, the root key alone,
    or another generation gives another."""
    ring, keys = node_keys_ring(3)
    gen = ring.generation(ring.sent)
    a, b, c = ring.peers
    ab = kr.psk_for(gen, a, b, keys[0])
    assert ab is not None and len(ab) == kr.KEY_BYTES
    assert kr.psk_for(gen, b, a, keys[1]) == ab
    assert kr.bound_pair_psk(gen, keys[2], a, b) != ab  # c's key in a's place
    assert kr.bound_pair_psk(gen, keys[2], c, b) != ab  # c's own pair with b
    assert pair_psk(gen, a.ip, b.ip) != ab  # the root key alone
    other = Generation(gen.id + 1, gen.key, node_keys=True)
    assert kr.psk_for(other, a, b, keys[0]) != ab


def test_no_bound_psk_without_both_public_keys_or_with_a_stale_own_key() -> None:
    ring, keys = node_keys_ring(2)
    gen = ring.generation(ring.sent)
    a, b = ring.peers
    assert kr.psk_for(gen, a, dataclasses.replace(b, pub=None), keys[0]) is None
    assert kr.psk_for(gen, a, b, None) is None
    assert kr.psk_for(gen, a, b, kr.new_node_key()) is None  # the keyring lists another key
    legacy = Generation(gen.id, gen.key)
    assert kr.psk_for(legacy, a, b, None) == pair_psk(legacy, a.ip, b.ip)


def test_public_keys_and_node_keys_round_trip_and_older_keyrings_still_load() -> None:
    ring, _ = node_keys_ring(3)
    assert loads(dumps(ring)) == ring
    doc = json.loads(dumps(ring))
    assert doc["generations"][0]["node_keys"] is True and "pub" in doc["peers"][0]
    assert doc["version"] == 2  # an agent that knows only format 1 refuses it
    doc["version"] = 1
    with pytest.raises(KeyringError, match="version 1 cannot hold"):
        loads(json.dumps(doc))
    for item in doc["generations"]:
        del item["node_keys"]
    for item in doc["peers"]:
        del item["pub"]
    old = loads(json.dumps(doc))
    assert json.loads(dumps(old))["version"] == 1
    assert not old.generation(old.sent).node_keys and all(p.pub is None for p in old.peers)


@pytest.mark.parametrize("pub", ["", "not base64!", base64.b64encode(b"x" * 31).decode(), 7])
def test_a_malformed_public_key_is_one_sentence_naming_the_peer(pub: Any) -> None:
    doc = valid_doc()
    doc["peers"][1]["pub"] = pub
    with pytest.raises(KeyringError) as error:
        loads(json.dumps(doc))
    assert_one_sentence(str(error.value))
    assert doc["peers"][1]["name"] in str(error.value)


def test_node_keys_must_be_a_boolean() -> None:
    doc = valid_doc()
    doc["generations"][0]["node_keys"] = "yes"
    with pytest.raises(KeyringError, match="node_keys") as error:
        loads(json.dumps(doc))
    assert_one_sentence(str(error.value))
