"""sa_wire decodes list-sa events as the vici package's full decode would, for the fields
the planner reads, and rejects what is not the VICI encoding in one sentence."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from vici.protocol import FiniteStream, Message

from overlay_vici.agent.sa_plan import IkeSa
from overlay_vici.agent.sa_wire import MalformedEvent, decode_list_sa


def full_decode(payload: bytes) -> list[IkeSa]:
    """The reference: the vici package's decode, then the fields the planner reads."""
    result = []
    for conn, sa in Message.deserialize(FiniteStream(payload)).items():
        children = list((sa.get("child-sas") or {}).values())
        result.append(
            IkeSa(
                unique_id=sa.get("uniqueid", b"").decode(),
                conn=conn,
                state=sa.get("state", b"").decode(),
                established_ago=int(sa["established"]) if "established" in sa else None,
                child_ids=tuple(
                    c.get("uniqueid", b"").decode()
                    for c in children
                    if c.get("state") == b"INSTALLED"
                ),
                initiator=sa.get("initiator") == b"yes",
                local_host=sa.get("local-host", b"").decode(),
                remote_host=sa.get("remote-host", b"").decode(),
                last_in_ago=min(
                    (int(c["use-in"]) for c in children if "use-in" in c), default=None
                ),
            )
        )
    return result


def established(i: int, children: int = 1) -> bytes:
    """A list-sa event shaped as charon 5.9.8 sends it (vici_query.c list_ike/list_child)."""

    def child(n: int) -> OrderedDict[str, Any]:
        return OrderedDict(
            [
                ("name", "ipip"), ("uniqueid", str(100 + n)), ("reqid", "1"),
                ("state", "INSTALLED" if n else "REKEYED"), ("mode", "TRANSPORT"),
                ("protocol", "ESP"), ("spi-in", "c1a2b3c4"), ("spi-out", "d1e2f3a4"),
                ("encr-alg", "AES_GCM_16"), ("encr-keysize", "128"), ("bytes-in", "1200"),
                ("packets-in", "12"), ("use-in", str(3 + n)), ("bytes-out", "0"),
                ("packets-out", "0"), ("rekey-time", "3000"), ("life-time", "3600"),
                ("install-time", "120"), ("local-ts", ["10.99.0.1/32[ipencap]"]),
                ("remote-ts", [f"10.99.0.{i}/32[ipencap]"]),
            ]
        )  # fmt: skip

    ike = OrderedDict(
        [
            ("uniqueid", str(i)), ("version", "2"), ("state", "ESTABLISHED"),
            ("local-host", "10.99.0.1"), ("local-port", "500"), ("local-id", "10.99.0.1"),
            ("remote-host", f"10.99.0.{i}"), ("remote-port", "500"),
            ("remote-id", f"10.99.0.{i}"), ("initiator", "yes"),
            ("initiator-spi", "0123456789abcdef"), ("responder-spi", "fedcba9876543210"),
            ("encr-alg", "AES_GCM_16"), ("dh-group", "CURVE_25519"), ("established", "1234"),
            ("rekey-time", "13000"),
            ("child-sas", OrderedDict((f"ipip-{100 + n}", child(n)) for n in range(children))),
            ("tasks-queued", []), ("tasks-active", ["IKE_DPD"]),
        ]
    )  # fmt: skip
    return Message.serialize(OrderedDict([(f"ovv-n{i}", ike)]))


@pytest.mark.parametrize("children", [0, 1, 2])
def test_an_established_ike_sa_decodes_as_the_full_decode(children: int) -> None:
    payload = established(7, children)
    assert decode_list_sa(payload) == full_decode(payload)
    (sa,) = decode_list_sa(payload)
    assert sa.conn == "ovv-n7" and sa.state == "ESTABLISHED" and sa.established_ago == 1234
    assert sa.child_ids == tuple(str(100 + n) for n in range(1, children))  # INSTALLED only


_names = st.text(st.characters(min_codepoint=97, max_codepoint=122), min_size=1, max_size=12)
_values = st.one_of(st.sampled_from(["yes", "INSTALLED", "ESTABLISHED", "12"]), _names)
_IKE = ["uniqueid", "state", "initiator", "local-host", "remote-host"]


def _fields(wanted: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Some of the keys the decoder reads (values, as charon sends them) among others that
    are values or lists, which it must skip."""
    others = st.dictionaries(
        _names.filter(lambda name: name not in wanted),
        st.one_of(_values, st.lists(_values, max_size=3)),
        max_size=5,
    )
    return st.tuples(st.dictionaries(st.sampled_from(wanted), _values), others).map(
        lambda pair: {**pair[1], **pair[0]}
    )


@given(
    st.dictionaries(
        _names,
        st.tuples(
            _fields(_IKE),
            st.one_of(
                st.none(), st.dictionaries(_names, _fields(["uniqueid", "state"]), max_size=3)
            ),
            st.one_of(st.none(), st.integers(0, 10**6)),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_any_message_decodes_as_the_full_decode(sas: dict[str, Any]) -> None:
    """Unknown keys, lists, nested sections, missing fields: the same IkeSa either way."""
    message: dict[str, Any] = {}
    for conn, (fields, children, established_ago) in sas.items():
        ike = {k: v for k, v in fields.items() if k not in ("established", "child-sas")}
        if established_ago is not None:
            ike["established"] = str(established_ago)
        if children is not None:
            ike["child-sas"] = children
        message[conn] = ike
    payload = Message.serialize(message)
    assert decode_list_sa(payload) == full_decode(payload)


@pytest.mark.parametrize(
    "payload",
    [
        established(3)[:-1],  # the last section end missing
        established(3)[:40],  # cut inside a value
        b"\x02",  # closes a section never opened
        b"\x09abc",  # no such element type
        Message.serialize({"c": {"established": "soon"}}),  # not a number
    ],
)
def test_what_is_not_a_list_sa_event_is_refused_in_one_sentence(payload: bytes) -> None:
    with pytest.raises(MalformedEvent, match=r"^malformed list-sa event of \d+ bytes: "):
        decode_list_sa(payload)
