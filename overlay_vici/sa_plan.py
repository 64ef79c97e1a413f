"""Plan what to do about established IKE_SAs: reauthenticate the stale, drop duplicates.

Pure. Both ends of a pair see the same IKE_SAs, so each rule names one end to act, and
the other end acts only when the first has had its chance (its agent may be down).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address

IP = IPv4Address | IPv6Address
REAUTH_POLL = 2.0
REAUTH_RETRY = 30.0  # a reauthentication not done by then (peer down?) is tried again


@dataclass(frozen=True)
class IkeSa:
    unique_id: str
    conn: str
    state: str
    established_ago: int | None
    children_installed: int
    initiator: bool  # this end initiated it


@dataclass(frozen=True)
class Timing:
    reauth_delay: float  # this agent's jitter after a switch
    reauth_grace: float  # extra wait before the other end steps in
    resync: float


@dataclass
class SaPlan:
    stale: list[IkeSa] = field(default_factory=list)
    reauthenticate: list[IkeSa] = field(default_factory=list)
    terminate: list[IkeSa] = field(default_factory=list)
    wait: float = 0.0


def plan_sas(
    sas: list[IkeSa],
    now: float,
    sent_since: float,
    own_ip: IP,
    peer_ips: dict[str, IP],
    issued: dict[str, float],
    timing: Timing,
) -> SaPlan:
    """IKE_SAs authenticated before `sent_since` are stale and get reauthenticated, one per
    connection at a time (two at once can each refuse the other's new CHILD_SA as a
    duplicate, leaving none). Duplicates from simultaneous initiation are dropped by the
    lower-IP end, which keeps the one it initiated."""
    result = SaPlan(wait=timing.resync)
    established = [sa for sa in sas if sa.state == "ESTABLISHED" and sa.established_ago is not None]
    by_conn: dict[str, list[IkeSa]] = {}
    for sa in established:
        by_conn.setdefault(sa.conn, []).append(sa)
    for conn, group in by_conn.items():
        # established_ago has whole seconds: count an SA from that second as stale.
        stale = [sa for sa in group if now - sa.established_ago - 1 < sent_since]  # type: ignore[operator]
        result.stale += stale
        leads = _leads(own_ip, peer_ips.get(conn))
        if stale:
            _plan_reauth(result, stale, now, sent_since, leads, issued, timing)
        elif len(group) > 1 and leads:
            keep = min(group, key=lambda sa: (not sa.initiator, sa.established_ago))
            result.terminate += [sa for sa in group if sa is not keep]
    return result


def _plan_reauth(
    result: SaPlan,
    stale: list[IkeSa],
    now: float,
    sent_since: float,
    leads: bool,
    issued: dict[str, float],
    timing: Timing,
) -> None:
    due = sent_since + timing.reauth_delay + (0 if leads else timing.reauth_grace)
    pending = any(now - issued.get(sa.unique_id, -REAUTH_RETRY) < REAUTH_RETRY for sa in stale)
    if pending or now < due:
        result.wait = min(result.wait, max(due - now, REAUTH_POLL))
        return
    result.reauthenticate.append(stale[0])
    result.wait = min(result.wait, REAUTH_POLL)


def _leads(own_ip: IP, peer_ip: IP | None) -> bool:
    """The lower node IP acts first for the pair, so that the two ends do not cross."""
    return peer_ip is None or own_ip < peer_ip
