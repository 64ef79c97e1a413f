"""Plan what to do about established IKE_SAs: reauthenticate the stale, drop duplicates,
bring up connections the other end has not.

Pure. Both ends of a pair see the same IKE_SAs, so each rule names one end to act, and
the other end acts only when the first has had its chance (its agent may be down).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address

from overlay_vici.core.keyring import parse_ip

IP = IPv4Address | IPv6Address
REAUTH_POLL = 2.0
REAUTH_RETRY = 30.0  # a reauthentication not done by then (peer down?) is tried again
# charon counts `established` in whole seconds of its own clock, so established_ago may be
# a second more than the truth: an IKE_SA made this long after sent_since is surely fresh,
# at both ends, so no reauthentication starts sooner.
REAUTH_AFTER = 2.0
# The higher-IP end counts an IKE_SA its lower-IP peer initiated as stale only if it
# predates sent_since by more than this. The peer reauthenticates first and is the judge;
# rounding or clock skew must not make this end step in with a replacement that the peer,
# keeping its own, closes as a duplicate, again and again (seen once in the guest).
PEER_SLACK = 5.0
# After loading a connection into a new charon that did not hold it, the higher-IP end
# initiates too, this long after the lower-IP end (which initiates at once), unless an
# IKE_SA exists by then: a restarted charon's peers may still hold IKE_SAs with it that only
# its own initiation (INITIAL_CONTACT) replaces, whichever end has the lower IP. (A charon
# that restarted under a running agent gets no grace: see SaUpkeep.schedule_initiations.)
INITIATE_GRACE = 2.0
# At most this many initiations, reauthentications included, per pass, the next pass at
# once: charon builds each IKE_SA_INIT before it answers `initiate`, and the cost grows
# with the IKE_SAs it holds (about 1 ms each at 1,000), so a lowest-IP node's 999 in one
# pass would block the agent for seconds, with no look at the Secret meanwhile. Not fewer:
# every pass lists charon's IKE_SAs, which at 1,000 costs charon about as much CPU as a few
# hundred initiations; with 64 a pass, establishing 999 peers took 49 s in the UML guest
# against 30 s in one burst (BENCHMARKS.md).
INITIATE_BATCH = 256
# The lower-IP end reauthenticates its stale IKE_SAs at charon's pace, a batch a pass: the
# lowest-IP node of 1,000 took 60-113 s for its 999 in the UML guest (BENCHMARKS.md), about
# 10 a second. The other end waits a peer's share of that on top of --reauth-grace, so that
# it steps in for a lower end that is down, not for one still working through its queue.
LEAD_REAUTH_RATE = 10.0


@dataclass(frozen=True)
class IkeSa:
    unique_id: str
    conn: str
    state: str
    established_ago: int | None
    child_ids: tuple[str, ...]  # unique ids of its installed CHILD_SAs
    initiator: bool  # this end initiated it
    local_host: str = ""  # the addresses it runs between ("" if charon did not say)
    remote_host: str = ""
    # Seconds since a CHILD_SA of it last received a packet; None: none ever did.
    last_in_ago: int | None = None

    @property
    def children_installed(self) -> int:
        return len(self.child_ids)


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
    # Stale IKE_SAs a fresh sibling replaces: their CHILD_SAs are closed first, then they.
    retire: list[IkeSa] = field(default_factory=list)
    moved: list[IkeSa] = field(default_factory=list)  # on an address no longer the node's
    orphans: list[IkeSa] = field(default_factory=list)  # the peer no longer has them
    initiate: list[str] = field(default_factory=list)  # connection names
    settled: list[str] = field(default_factory=list)  # pending initiations no longer needed
    wait: float = 0.0


def plan_sas(
    sas: list[IkeSa],
    now: float,
    sent_since: float,
    own_ip: IP,
    peer_ips: dict[str, IP],
    issued: dict[str, float],
    timing: Timing,
    initiate_due: Mapping[str, float] | None = None,
    stale_ids: frozenset[str] | None = None,
) -> SaPlan:
    """IKE_SAs authenticated before `sent_since` are stale and get reauthenticated, one per
    connection at a time (two at once can each refuse the other's new CHILD_SA as a
    duplicate, leaving none). The agent makes before it breaks, in three steps so that no
    packet is lost: a new IKE_SA beside the stale one (`reauthenticate`); once that carries
    the pair, the stale one's CHILD_SAs closed, and then, childless, the stale IKE_SA
    (`retire`). charon's own reauthentication deletes the old IKE_SA in one exchange, after
    which the end that answered it kept sending on the old SA for an instant that the other
    end had already deleted (render.POLICY_PRIORITY keeps the answering end on the old SA
    until then). The peer deletes a CHILD_SA before it answers the DELETE, so it has moved to
    the new SA before this end stops accepting the old one.

    Duplicates from simultaneous initiation are dropped by the lower-IP end, which keeps the
    one it initiated. A connection in `initiate_due` (name: when) is initiated once due if
    it still has no IKE_SA in any state, the earliest due first; initiations and
    reauthentications together take at most INITIATE_BATCH a pass.

    `stale_ids`, the IKE_SAs charon held right after the new sent key was loaded, are
    exactly the stale ones when known. `established_ago` counts whole seconds, so without
    them an SA from the second after `sent_since` counts as stale too: one the peer made
    just after this end switched would wait for this end's reauth_grace.

    IKE_SAs between addresses that are no longer this node's or the peer's (a node's IP
    changed) are `moved`: to close at once, from either end, as their peer is gone.

    When both ends initiate at once, both send INITIAL_CONTACT, and the end that takes the
    other's second silently destroys the IKE_SA it had initiated: its peer keeps the
    responder's half, an `orphan` that no packet ever arrives on, and whose CHILD_SA, if
    newer, swallows this end's traffic until DPD gives up (minutes). The lower-IP end never
    sees such a duplicate, so the other end closes it: once the duplicate has lasted
    resync + REAUTH_POLL, the IKE_SAs that received nothing for that long while a sibling
    did."""
    result = SaPlan(wait=timing.resync)
    result.moved = [sa for sa in sas if _moved(sa, own_ip, peer_ips.get(sa.conn))]
    sas = [sa for sa in sas if sa not in result.moved]
    present = {sa.conn for sa in sas}
    for conn, due in sorted((initiate_due or {}).items(), key=lambda item: (item[1], item[0])):
        if conn in present:
            result.settled.append(conn)
        elif now < due:
            result.wait = min(result.wait, due - now)
        elif len(result.initiate) < INITIATE_BATCH:
            result.initiate.append(conn)
        else:
            result.wait = 0.0  # more are due: the next pass takes them
    established = [sa for sa in sas if sa.state == "ESTABLISHED" and sa.established_ago is not None]
    by_conn: dict[str, list[IkeSa]] = {}
    for sa in established:
        by_conn.setdefault(sa.conn, []).append(sa)
    for conn, group in by_conn.items():
        leads = lower_ip_leads(own_ip, peer_ips.get(conn))
        if not leads and len(group) > 1:
            orphans = _orphans(group, timing.resync + REAUTH_POLL)
            result.orphans += orphans
            group = [sa for sa in group if sa not in orphans]
        if stale_ids is not None:
            stale = [sa for sa in group if sa.unique_id in stale_ids]
        else:  # established_ago has whole seconds: count an SA from that second as stale
            stale = [
                sa
                for sa in group
                if now - sa.established_ago - 1  # type: ignore[operator]
                < sent_since - (PEER_SLACK if not leads and not sa.initiator else 0.0)
            ]
        result.stale += stale
        fresh = [sa for sa in group if sa not in stale]
        # The lower-IP end retires; the other end only what replaced its own initiation
        # (it stepped in for the lower end's agent, which is down).
        retires = leads or any(sa.initiator for sa in fresh)
        if stale and retires and any(sa.children_installed for sa in fresh):
            result.retire += stale  # a fresh SA carries the pair
            result.wait = min(result.wait, REAUTH_POLL)
        elif stale and fresh:
            # A replacement is under way: its CHILD_SA is on the way, or its maker retires
            # the stale one. Stepping in now would make a duplicate.
            result.wait = min(result.wait, REAUTH_POLL)
        elif stale:
            _plan_reauth(result, stale, now, sent_since, leads, issued, timing, len(peer_ips))
        elif len(group) > 1 and leads:
            keep = min(group, key=lambda sa: (not sa.initiator, sa.established_ago))
            result.terminate += [sa for sa in group if sa is not keep]
    room = max(INITIATE_BATCH - len(result.initiate), 0)
    if len(result.reauthenticate) > room:  # the rest on the next pass, at once
        result.reauthenticate, result.wait = result.reauthenticate[:room], 0.0
    return result


def at_rest(sas: list[IkeSa], decided: SaPlan, resync: float) -> bool:
    """Nothing to do and nothing under way: one established IKE_SA with its CHILD_SA per
    connection at most, and no pass due before the resync. Until charon's IKE_SAs change,
    listing them again would find the same (SaUpkeep skips it then)."""
    busy = (
        decided.stale
        or decided.reauthenticate
        or decided.terminate
        or decided.retire
        or decided.moved
        or decided.orphans
        or decided.initiate
        or decided.wait < resync
    )
    conns = [sa.conn for sa in sas]
    return (
        not busy
        and len(conns) == len(set(conns))
        and all(sa.state == "ESTABLISHED" and sa.child_ids for sa in sas)
    )


def _plan_reauth(
    result: SaPlan,
    stale: list[IkeSa],
    now: float,
    sent_since: float,
    leads: bool,
    issued: dict[str, float],
    timing: Timing,
    peers: int,
) -> None:
    grace = 0.0 if leads else timing.reauth_grace + peers / LEAD_REAUTH_RATE
    due = sent_since + REAUTH_AFTER + timing.reauth_delay + grace
    pending = any(now - issued.get(sa.unique_id, -REAUTH_RETRY) < REAUTH_RETRY for sa in stale)
    if pending or now < due:
        result.wait = min(result.wait, max(due - now, REAUTH_POLL))
        return
    result.reauthenticate.append(stale[0])
    result.wait = min(result.wait, REAUTH_POLL)


def _orphans(group: list[IkeSa], grace: float) -> list[IkeSa]:
    """The IKE_SAs of a lasting duplicate that received nothing for `grace` seconds while
    another did."""
    ages = sorted((sa.established_ago or 0 for sa in group), reverse=True)
    if ages[1] < grace:  # the duplicate is younger than the lower-IP end's chance to act
        return []
    idle = [sa for sa in group if sa.last_in_ago is None or sa.last_in_ago >= grace]
    return idle if len(idle) < len(group) else []


def _moved(sa: IkeSa, own_ip: IP, peer_ip: IP | None) -> bool:
    try:
        local = parse_ip(sa.local_host) if sa.local_host else own_ip
        remote = parse_ip(sa.remote_host) if sa.remote_host else peer_ip
    except ValueError:
        return False
    return local != own_ip or (peer_ip is not None and remote != peer_ip)


def lower_ip_leads(own_ip: IP, peer_ip: IP | None) -> bool:
    """Whether this end leads the pair: the lower node IP acts first (initiates, keeps its
    own of two duplicates, reauthenticates first), so that the two ends do not cross."""
    return peer_ip is None or own_ip < peer_ip
