"""Decode charon's `list-sa` events straight from the VICI wire format into IkeSa.

Pure. The `vici` package decodes every value of every IKE_SA into dicts: that was about
80 % of a `list-sas` with 1,000 IKE_SAs (BENCHMARKS.md), on every step that lists. This
walks the same encoding (strongSwan's vici_message.h: a type byte, then a 1-byte name
length and name, then for values a 2-byte length), keeps only what the planner reads and
skips everything else by its length, without building it.
"""

from __future__ import annotations

from overlay_vici.agent.sa_plan import IkeSa

SECTION_START, SECTION_END, KEY_VALUE, LIST_START, LIST_ITEM, LIST_END = range(1, 7)
_IKE_KEYS = frozenset(
    {b"uniqueid", b"state", b"established", b"initiator", b"local-host", b"remote-host"}
)
_CHILD_KEYS = frozenset({b"uniqueid", b"state", b"use-in"})
_CHILD_SAS = b"child-sas"


class MalformedEvent(ValueError):
    """A list-sa event that does not follow the VICI encoding."""


def decode_list_sa(payload: bytes) -> list[IkeSa]:
    """The IKE_SAs of one list-sa event payload (the message after the event name)."""
    try:
        return _walk(payload)
    except (IndexError, ValueError) as exc:  # cut short, or a value that is not text/number
        raise MalformedEvent(f"malformed list-sa event of {len(payload)} bytes: {exc}") from None


def _walk(payload: bytes) -> list[IkeSa]:
    sas: list[IkeSa] = []
    path: list[bytes] = []
    ike: dict[bytes, bytes] = {}
    child: dict[bytes, bytes] = {}
    children: list[dict[bytes, bytes]] = []
    wanted: frozenset[bytes] | None = None  # the keys to keep where we are, if any
    i, end = 0, len(payload)
    while i < end:
        kind = payload[i]
        if kind == KEY_VALUE:
            name_end = i + 2 + payload[i + 1]
            size = (payload[name_end] << 8) | payload[name_end + 1]
            if wanted is not None:
                key = payload[i + 2 : name_end]
                if key in wanted:
                    (ike if wanted is _IKE_KEYS else child)[key] = payload[
                        name_end + 2 : name_end + 2 + size
                    ]
            i = name_end + 2 + size
        elif kind == SECTION_START:
            name_end = i + 2 + payload[i + 1]
            path.append(payload[i + 2 : name_end])
            i = name_end
            if len(path) == 1:
                ike, children, wanted = {}, [], _IKE_KEYS
            elif len(path) == 3 and path[1] == _CHILD_SAS:
                child, wanted = {}, _CHILD_KEYS
            else:
                wanted = None
        elif kind == SECTION_END:
            if not path:
                raise ValueError(f"a section closed that never opened, at byte {i}")
            if len(path) == 3 and path[1] == _CHILD_SAS:
                children.append(child)
            elif len(path) == 1:
                sas.append(_ike_sa(path[0], ike, children))
            path.pop()
            wanted = _IKE_KEYS if len(path) == 1 else None
            i += 1
        elif kind == LIST_START:
            i += 2 + payload[i + 1]
        elif kind == LIST_ITEM:
            i += 3 + ((payload[i + 1] << 8) | payload[i + 2])
        elif kind == LIST_END:
            i += 1
        else:
            raise ValueError(f"element type {kind} at byte {i}")
    if path or i != end:
        raise ValueError("it ends inside a section or value")
    return sas


def _ike_sa(conn: bytes, ike: dict[bytes, bytes], children: list[dict[bytes, bytes]]) -> IkeSa:
    established = ike.get(b"established")
    return IkeSa(
        unique_id=ike.get(b"uniqueid", b"").decode(),
        conn=conn.decode(),
        state=ike.get(b"state", b"").decode(),
        established_ago=int(established) if established is not None else None,
        child_ids=tuple(
            c.get(b"uniqueid", b"").decode() for c in children if c.get(b"state") == b"INSTALLED"
        ),
        initiator=ike.get(b"initiator") == b"yes",
        local_host=ike.get(b"local-host", b"").decode(),
        remote_host=ike.get(b"remote-host", b"").decode(),
        last_in_ago=min((int(c[b"use-in"]) for c in children if b"use-in" in c), default=None),
    )
