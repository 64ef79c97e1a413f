"""The master's pure core: from what it knows now, the next keyring and rotation state.

No I/O and no clock: the caller passes the keyring and master state read from the
Secret, the node list, the agents' reports and `now`, and publishes what `decide` returns.

A rotation has three phases, each entered only when every *live* agent has applied the
keyring that started the one before (see the README):

    idle (A sent) -> stage (A sent, B accepted) -> switch (B sent, A accepted)
         -> retire (B only) -> idle

switch -> retire also needs every live agent to report its IKE_SAs reauthenticated after
the switch (none stale, or stale only towards nodes whose agents are not live). An agent
is live while its last report is younger than `Policy.agent_timeout`; an agent that is not
(expired, or never reported) is listed and skipped: it does not block the mesh, and when
it returns it loads whatever keyring is current and catches up.

The encryption switch changes in a cutover, entered only while idle (and no rotation starts
during one), so that every agent changes mode at the same moment:

    announced (at None: agents get ready, enforce nothing new)
         -> every live agent has that keyring -> scheduled (at = now + lead) -> done

The lead is at least twice the time the acknowledgements took, so that the scheduling
keyring reaches every agent before its moment; an agent that sees it late acts at once.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from overlay_vici.core import keyring as kr
from overlay_vici.core.contract import (
    PHASES,
    AgentReport,
    int_or_none,
    is_node_name,
    is_number,
)

HISTORY = 5  # rotations kept in the master state, for `status` and the benchmark


@dataclass(frozen=True)
class NodeInfo:
    """A node as the master sees it: name, InternalIP, and whether it opted out."""

    name: str
    ip: str | None
    opted_out: bool = False


@dataclass(frozen=True)
class Policy:
    interval: float = 24 * 3600.0  # seconds between rotations
    agent_timeout: float = 90.0  # a report older than this: the agent is not live
    cutover_lead: float = 10.0  # the least time between scheduling a switch and its moment


@dataclass(frozen=True)
class MasterState:
    """Master-only metadata, kept beside the keyring (master.json); agents never read it."""

    phase: str = "idle"
    rotation: int = 0  # rotations started so far
    phase_serial: int = 0  # serial of the keyring that entered the current phase
    last_rotation: float | None = None  # when the last rotation ended (or the mesh began)
    handled_request: str | None = None  # the last on-demand request a rotation started for
    expired: tuple[str, ...] = ()  # agents skipped, as last logged
    # Per rotation: {"rotation": n, "stage": t, "switch": t, "retire": t, "idle": t}.
    history: tuple[Mapping[str, float], ...] = ()
    # While a switch is announced: the serial of the keyring that announced it, and when.
    cutover_serial: int | None = None
    cutover_announced: float | None = None

    @property
    def rotating(self) -> bool:
        return self.phase != "idle"


@dataclass(frozen=True)
class Decision:
    keyring: kr.Keyring
    state: MasterState
    changed: bool  # keyring or state differ from what was read: publish
    waiting: tuple[str, ...]  # live agents the current phase still waits for
    expired: tuple[str, ...]  # peers whose agent's report is too old: skipped
    absent: tuple[str, ...]  # peers whose agent never reported: skipped
    events: tuple[tuple[str, dict[str, Any]], ...] = ()  # (log event, fields), no keys


def dumps_state(state: MasterState) -> str:
    doc = dataclasses.asdict(state)
    doc["expired"] = list(state.expired)
    doc["history"] = [dict(h) for h in state.history]
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"


def loads_state(text: str | bytes | None) -> MasterState | None:
    """The master state, or None if missing or unreadable (then it is inferred)."""
    if not text:
        return None
    try:
        doc = json.loads(text)
        state = MasterState(
            phase=doc["phase"],
            rotation=int(doc["rotation"]),
            phase_serial=int(doc["phase_serial"]),
            last_rotation=_float_or_none(doc.get("last_rotation")),
            handled_request=doc.get("handled_request"),
            expired=tuple(doc.get("expired", ())),
            history=tuple(dict(h) for h in doc.get("history", ())),
            cutover_serial=int_or_none(doc.get("cutover_serial")),
            cutover_announced=_float_or_none(doc.get("cutover_announced")),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return state if state.phase in PHASES else None


def phase_of(keyring: kr.Keyring) -> str | None:
    """The phase a keyring's shape implies; one generation is idle or retire alike."""
    ids = sorted(g.id for g in keyring.generations)
    if len(ids) == 1:
        return None
    if len(ids) == 2:
        return "stage" if keyring.sent == ids[0] else "switch"
    return "invalid"


def consistent(keyring: kr.Keyring, state: MasterState) -> MasterState:
    """The state, or one inferred from the keyring if they disagree (e.g. a manual edit)."""
    announced = keyring.encryption.at is None
    if announced != (state.cutover_serial is not None):
        # As the keyring says; an announcement the state lost waits for the current serial.
        serial = keyring.serial if announced else None
        state = dataclasses.replace(state, cutover_serial=serial, cutover_announced=None)
    shape = phase_of(keyring)
    if shape is None and state.phase in ("idle", "retire"):
        return state
    if shape == state.phase:
        return state
    # One generation: finish as a retire (wait for the acks). Two: the phase their roles show.
    inferred = "retire" if shape is None else shape
    if inferred == "invalid":
        inferred = "switch"  # see _normalise: extra generations go at the next publish
    return dataclasses.replace(state, phase=inferred, phase_serial=keyring.serial)


def desired_peers(
    nodes: Iterable[NodeInfo], current: Iterable[kr.Peer]
) -> tuple[tuple[kr.Peer, ...], tuple[tuple[str, str], ...]]:
    """Peers from the node list, sorted by name, and the nodes left out with why.

    Left out: opted out, no InternalIP, not IPv4, invalid name, or an IP another node also
    claims (the node already holding it in the keyring keeps it; otherwise neither gets it).
    """
    skipped: list[tuple[str, str]] = []
    candidates: list[kr.Peer] = []
    for node in nodes:
        peer = _as_peer(node)
        if node.opted_out:
            skipped.append((node.name, "opted out"))
        elif isinstance(peer, str):
            skipped.append((node.name, peer))
        else:
            candidates.append(peer)
    holders = {p.ip: p.name for p in current}
    by_ip: dict[str, list[kr.Peer]] = {}
    for peer in candidates:
        by_ip.setdefault(peer.ip, []).append(peer)
    peers: list[kr.Peer] = []
    for ip, claimants in by_ip.items():
        if len(claimants) == 1:
            peers.extend(claimants)
            continue
        keeper = next((p for p in claimants if holders.get(ip) == p.name), None)
        if keeper:
            peers.append(keeper)
        skipped.extend(
            (p.name, f"InternalIP {ip} is claimed twice") for p in claimants if p != keeper
        )
    return tuple(sorted(peers, key=lambda p: p.name)), tuple(sorted(skipped))


def with_public_keys(
    peers: Iterable[kr.Peer], reports: Mapping[str, AgentReport], current: Iterable[kr.Peer]
) -> tuple[tuple[kr.Peer, ...], list[tuple[str, dict[str, Any]]]]:
    """The peers with the public key each one's agent last reported (kept as published while
    a report has none: an expired Lease is no new key), and an event per key published or
    changed. A node's key is whatever its own Lease says: only its agent may write it."""
    known = {p.name: p.pub for p in current}
    result: list[kr.Peer] = []
    events: list[tuple[str, dict[str, Any]]] = []
    for peer in peers:
        report = reports.get(peer.name)
        reported = report.public_key if report is not None else None
        pub = reported or known.get(peer.name)
        if reported and reported != known.get(peer.name):
            was = "node public key changed" if known.get(peer.name) else "node public key added"
            events.append((was, {"node": peer.name}))
        result.append(dataclasses.replace(peer, pub=pub))
    return tuple(result), events


def outside_peers(nodes: Iterable[NodeInfo], peers: Iterable[kr.Peer]) -> tuple[kr.Peer, ...]:
    """The opted-out nodes the agents' guards must let plaintext IPIP reach, sorted by name:
    those with a valid name and IPv4 InternalIP that no peer holds (of two claiming one IP,
    the first by name: the guard allows the IP, whichever name it carries)."""
    taken = {p.ip for p in peers}
    outside: list[kr.Peer] = []
    for node in sorted(nodes, key=lambda n: n.name):
        peer = _as_peer(node)
        if node.opted_out and isinstance(peer, kr.Peer) and peer.ip not in taken:
            taken.add(peer.ip)
            outside.append(peer)
    return tuple(outside)


def _as_peer(node: NodeInfo) -> kr.Peer | str:
    """The node as a keyring entry, or why it cannot be one."""
    if not is_node_name(node.name):
        return "invalid node name"
    if not node.ip:
        return "no InternalIP"
    if (address := _ipv4(node.ip)) is None:
        return f"InternalIP {node.ip} is not IPv4"
    return kr.Peer(node.name, address)


def classify(
    peers: Iterable[kr.Peer], reports: Mapping[str, AgentReport], now: float, policy: Policy
) -> tuple[dict[str, AgentReport], tuple[str, ...], tuple[str, ...]]:
    """Live reports of the peers' agents, and the peers whose agents are expired or absent."""
    live: dict[str, AgentReport] = {}
    expired: list[str] = []
    absent: list[str] = []
    for peer in peers:
        report = reports.get(peer.name)
        if report is None:
            absent.append(peer.name)
        elif now - report.heartbeat > policy.agent_timeout:
            expired.append(peer.name)
        else:
            live[peer.name] = report
    return live, tuple(expired), tuple(absent)


def applied(report: AgentReport, serial: int) -> bool:
    """Has this agent loaded the keyring with this serial, or a newer one?"""
    return report.keyring_serial is not None and report.keyring_serial >= serial


def completed(
    report: AgentReport, phase: str, phase_serial: int, sent: int, live: set[str]
) -> bool:
    """Has this agent finished the current phase? `live`: the peers whose agents are live."""
    if not applied(report, phase_serial):
        return False
    if phase != "switch":
        return True
    if report.sent_generation != sent:
        return False
    if report.reauthenticated:
        return True
    # Stale IKE_SAs only towards nodes whose agents are not live (expired, absent, or no
    # longer peers) do not hold the mesh back: those agents catch up when they return.
    return report.stale_peers is not None and not set(report.stale_peers) & live


def phase_waiting(
    state: MasterState, live: Mapping[str, AgentReport], sent: int
) -> tuple[str, ...]:
    """Live agents that have not yet finished the current rotation phase."""
    names = set(live)
    return tuple(
        name
        for name, report in sorted(live.items())
        if not completed(report, state.phase, state.phase_serial, sent, names)
    )


def rotation_due(state: MasterState, now: float, policy: Policy, request: str | None) -> str | None:
    """Why a rotation should start now, or None."""
    if request and request != state.handled_request:
        return "requested"
    if state.last_rotation is not None and now - state.last_rotation >= policy.interval:
        return "interval"
    return None


def decide(
    keyring: kr.Keyring | None,
    state: MasterState | None,
    nodes: Iterable[NodeInfo] | None,
    reports: Mapping[str, AgentReport],
    now: float,
    policy: Policy,
    request: str | None = None,
    enabled: bool | None = None,
) -> Decision:
    """The next keyring and master state. At most one phase change per call.

    `nodes` None means the node list is not known yet: the peer list is kept as it is.
    `enabled` is the operator's desired switch, None to keep the keyring's.
    A new keyring (peers, outside list, phase or switch changed) always gets serial + 1.
    """
    events: list[tuple[str, dict[str, Any]]] = []
    if keyring is None:
        peers, skipped = desired_peers(nodes or (), ())
        peers, _ = with_public_keys(peers, reports, ())
        outside = outside_peers(nodes or (), peers)
        # Asked for on (the deployed settings say so): a cutover like any switch on, so that
        # the agents a fresh install rolls out get ready first and none drops the traffic of
        # nodes not ready yet. Not asked (local mode without a switch file): on at once.
        switch = kr.Encryption(enabled is not False, None if enabled else 0.0)
        created = kr.create(list(peers), encryption=switch, outside=outside, node_keys=True)
        events.append(
            (
                "keyring created",
                {
                    "serial": 1,
                    "generation": 1,
                    "peers": len(peers),
                    "outside": len(outside),
                    "encryption": switch.mode(now),
                },
            )
        )
        events.extend(("node skipped", {"node": n, "reason": r}) for n, r in skipped)
        fresh = MasterState(phase_serial=1, last_rotation=now)
        if switch.at is None:
            fresh = dataclasses.replace(fresh, cutover_serial=1, cutover_announced=now)
            events.append(("encryption switch announced", {"enabled": True}))
        return Decision(created, fresh, True, (), (), tuple(p.name for p in peers), tuple(events))

    original_state = state
    if state is None:
        # One generation may be a retire not yet acknowledged: finish it as one.
        state = MasterState(phase="retire", phase_serial=keyring.serial, last_rotation=now)
        events.append(("master state missing, inferred from the keyring", {}))
    state = consistent(keyring, state)
    if original_state is not None and state.phase != original_state.phase:
        events.append(
            (
                "master state disagreed with the keyring",
                {"was": original_state.phase, "now": state.phase},
            )
        )

    generations, sent = _normalise(keyring)
    sent_since = keyring.sent_since
    peers, outside = keyring.peers, keyring.outside
    if nodes is not None:
        peers, skipped = desired_peers(nodes, keyring.peers)
        outside = outside_peers(nodes, peers)
        if [(p.name, p.ip) for p in peers] != [(p.name, p.ip) for p in keyring.peers]:
            reasons = [f"{n}: {r}" for n, r in skipped]
            events.append(
                ("peer list changed", {**_changes(keyring.peers, peers), "skipped": reasons})
            )
        if outside != keyring.outside:
            events.append(("outside list changed", _changes(keyring.outside, outside)))
    peers, key_events = with_public_keys(peers, reports, keyring.peers)
    events.extend(key_events)

    live, expired, absent = classify(peers, reports, now, policy)
    not_live = set(expired) | set(absent)
    if expired != state.expired:
        for name in sorted(set(expired) - set(state.expired)):
            events.append(("agent expired, not waiting for it", {"node": name}))
        for name in sorted(set(state.expired) - set(expired)):
            events.append(("agent back or gone", {"node": name}))
        state = dataclasses.replace(state, expired=expired)

    waiting: tuple[str, ...] = ()
    next_state = state
    switch = keyring.encryption
    if state.phase == "idle":
        if switch.at is None and peers != keyring.peers:
            # Announced, and this keyring changes the peers or their keys: the switch waits
            # for the agents to have it (see the cutover_serial update below).
            waiting = tuple(sorted(live))
        else:
            switch, next_state, waiting, step_events = _cutover(
                switch, state, live, (expired, absent), enabled, now, policy
            )
            events.extend(step_events)
        steady = switch == keyring.encryption and not cutover_pending(switch, now)
        why = rotation_due(state, now, policy, request) if steady and switch.enabled else None
        if why:
            new_id = max(g.id for g in generations) + 1
            older = sorted(name for name, r in live.items() if r.public_key is None)
            fresh_key = kr.Generation(new_id, kr.new_generation_key(), node_keys=not older)
            generations = (*generations, fresh_key)
            if older:
                events.append(
                    (
                        "new generation without node keys",
                        {"generation": new_id, "agents_without_key": older[:10]},
                    )
                )
            handled = request if why == "requested" else state.handled_request
            next_state = dataclasses.replace(
                state,
                phase="stage",
                rotation=state.rotation + 1,
                handled_request=handled,
                history=(*state.history, {"rotation": state.rotation + 1, "stage": now})[-HISTORY:],
            )
            events.append(
                ("rotation started", {"rotation": state.rotation + 1, "reason": why, "new": new_id})
            )
    else:
        waiting = phase_waiting(state, live, sent)
        if not waiting:
            nxt = PHASES[(PHASES.index(state.phase) + 1) % len(PHASES)]
            newest = max(g.id for g in generations)
            if nxt == "switch":
                sent, sent_since = newest, now
            elif nxt == "retire":
                generations = tuple(g for g in generations if g.id == sent)
            history = state.history
            if history and history[-1].get("rotation") == state.rotation:
                history = (*history[:-1], {**history[-1], nxt: now})
            next_state = dataclasses.replace(
                state,
                phase=nxt,
                history=history,
                last_rotation=now if nxt == "idle" else state.last_rotation,
            )
            fields: dict[str, Any] = {"rotation": state.rotation, "sent": sent}
            if not_live:
                fields["skipped"] = sorted(not_live)
            events.append((f"rotation phase {nxt}" if nxt != "idle" else "rotation done", fields))

    new_keyring = keyring
    if (generations, sent, peers, switch, outside, sent_since) != (
        keyring.generations,
        keyring.sent,
        keyring.peers,
        keyring.encryption,
        keyring.outside,
        keyring.sent_since,
    ):
        new_keyring = kr.Keyring(
            keyring.serial + 1, sent, generations, peers, switch, outside, sent_since
        )
    if next_state.phase != state.phase:
        next_state = dataclasses.replace(next_state, phase_serial=new_keyring.serial)
        waiting = tuple(sorted(live)) if next_state.phase != "idle" else ()
    if switch.at is None and keyring.encryption.at is not None:  # announced by this keyring
        next_state = dataclasses.replace(
            next_state, cutover_serial=new_keyring.serial, cutover_announced=now
        )
    elif switch.at is None and new_keyring is not keyring:
        # Announced, and the peers or their keys changed since: the switch waits for the
        # newest keyring, or a fresh install would schedule it before the agents had each
        # other's public keys (and so their connections).
        next_state = dataclasses.replace(next_state, cutover_serial=new_keyring.serial)
    changed = new_keyring is not keyring or next_state != original_state
    return Decision(new_keyring, next_state, changed, waiting, expired, absent, tuple(events))


def cutover_pending(switch: kr.Encryption, now: float) -> bool:
    """A switch announced, or scheduled for a moment still ahead: no rotation starts, and no
    other switch."""
    return switch.at is None or switch.at > now


def cutover_waiting(state: MasterState, live: Mapping[str, AgentReport]) -> tuple[str, ...]:
    """Live agents that have not yet applied the keyring announcing the switch."""
    serial = state.cutover_serial or 0
    return tuple(name for name, report in sorted(live.items()) if not applied(report, serial))


def _cutover(
    switch: kr.Encryption,
    state: MasterState,
    live: Mapping[str, AgentReport],
    not_live: tuple[tuple[str, ...], tuple[str, ...]],
    enabled: bool | None,
    now: float,
    policy: Policy,
) -> tuple[kr.Encryption, MasterState, tuple[str, ...], list[tuple[str, dict[str, Any]]]]:
    """The switch's next step while no rotation runs: (switch, state, waiting, events).

    Announced and wanted back: withdrawn at once, as no node has started or stopped
    enforcing yet.
    Announced and applied by every live agent: scheduled. Agents that never reported
    (`absent`, e.g. still starting in a fresh install's rollout) are waited for too, but
    only for `agent_timeout` after the announcement; expired ones are skipped at once.
    Not pending and wanted otherwise: announced. A scheduled switch runs to its moment
    whatever is wanted meanwhile.
    """
    expired, absent = not_live
    target = {"enabled": enabled}
    cleared = dataclasses.replace(state, cutover_serial=None, cutover_announced=None)
    if switch.at is None:
        if enabled is not None and enabled != switch.enabled:
            return (
                kr.Encryption(enabled, now),
                cleared,
                (),
                [("encryption switch reverted", target)],
            )
        waiting = cutover_waiting(state, live)
        announced = state.cutover_announced
        if announced is not None and now - announced < policy.agent_timeout:
            waiting = tuple(sorted(waiting + absent))
        if waiting:
            return switch, state, waiting, []
        took = now - (announced if announced is not None else now)
        # Twice the acknowledgements' time covers the Secret's propagation; a rollout's
        # wait for starting agents is no measure of it, hence the cap.
        lead = max(policy.cutover_lead, min(2 * took, policy.agent_timeout))
        fields = {
            "enabled": switch.enabled,
            "at": round(now + lead, 3),
            "lead": round(lead, 3),
            "skipped": sorted(expired + absent),
        }
        scheduled = kr.Encryption(switch.enabled, now + lead)
        return scheduled, cleared, (), [("encryption switch scheduled", fields)]
    if enabled is not None and enabled != switch.enabled and not cutover_pending(switch, now):
        announced = kr.Encryption(enabled, None)
        return announced, state, tuple(sorted(live)), [("encryption switch announced", target)]
    return switch, state, (), []


def _changes(old: Iterable[kr.Peer], new: Iterable[kr.Peer]) -> dict[str, list[str]]:
    """Names that joined, left, or kept their place with another IP."""
    before = {p.name: p.ip for p in old}
    after = {p.name: p.ip for p in new}
    return {
        "joined": sorted(set(after) - set(before)),
        "left": sorted(set(before) - set(after)),
        "moved": sorted(n for n in set(after) & set(before) if after[n] != before[n]),
    }


def _normalise(keyring: kr.Keyring) -> tuple[tuple[kr.Generation, ...], int]:
    """Generations sorted by id; more than two (a manual edit) keep the sent one and the newest."""
    generations = tuple(sorted(keyring.generations, key=lambda g: g.id))
    if len(generations) > 2:
        keep = {keyring.sent, generations[-1].id}
        generations = tuple(g for g in generations if g.id in keep)
    return generations, keyring.sent


def _ipv4(value: str) -> str | None:
    """The canonical form of an IPv4 address, or None."""
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    return str(address) if address.version == 4 else None


def _float_or_none(value: Any) -> float | None:
    return float(value) if is_number(value) else None
