"""The master's pure core: peer list, the three rotation phases, liveness, restarts."""

from __future__ import annotations

import dataclasses

import pytest

from overlay_vici.core import keyring as kr
from overlay_vici.master.rotation import (
    AgentReport,
    Decision,
    MasterState,
    NodeInfo,
    Policy,
    decide,
    dumps_state,
    loads_state,
)

POLICY = Policy(interval=3600, agent_timeout=30)
NODES = [NodeInfo(f"n{i}", f"10.0.0.{i}") for i in range(1, 5)]


def ack(
    decision: Decision,
    names: list[str] | None = None,
    now: float = 0.0,
    reauthenticated: bool = True,
    stale_peers: tuple[str, ...] | None = None,
) -> dict[str, AgentReport]:
    """Reports of agents that applied the decision's keyring (all peers by default)."""
    keyring = decision.keyring
    return {
        name: AgentReport(
            node=name,
            heartbeat=now,
            keyring_serial=keyring.serial,
            sent_generation=keyring.sent,
            reauthenticated=reauthenticated,
            stale_ike_sas=0 if reauthenticated else 1,
            stale_peers=stale_peers,
        )
        for name in (names if names is not None else [p.name for p in keyring.peers])
    }


def step(previous: Decision, reports: dict[str, AgentReport], now: float, **kw: object) -> Decision:
    return decide(
        previous.keyring, previous.state, kw.pop("nodes", NODES), reports, now, POLICY, **kw
    )  # type: ignore[arg-type]


@pytest.fixture
def start() -> Decision:
    return decide(None, None, NODES, {}, 0.0, POLICY)


def test_first_keyring_holds_every_node_and_one_fresh_generation(start: Decision) -> None:
    assert start.changed
    assert [p.name for p in start.keyring.peers] == ["n1", "n2", "n3", "n4"]
    assert start.keyring.serial == 1 and start.keyring.sent == 1
    assert len(start.keyring.generations[0].key) == 32
    assert start.state.phase == "idle" and start.state.last_rotation == 0.0


def test_nothing_to_do_changes_nothing(start: Decision) -> None:
    again = step(start, ack(start), 10)
    assert not again.changed and again.keyring is start.keyring


def test_node_join_leave_and_ip_change_bump_the_serial_and_keep_the_keys(start: Decision) -> None:
    nodes = [NodeInfo("n1", "10.0.0.11"), *NODES[1:3], NodeInfo("n5", "10.0.0.5")]
    moved = step(start, {}, 1, nodes=nodes)
    assert moved.changed and moved.keyring.serial == 2
    assert {p.name: p.ip for p in moved.keyring.peers} == {
        "n1": "10.0.0.11",
        "n2": "10.0.0.2",
        "n3": "10.0.0.3",
        "n5": "10.0.0.5",
    }
    assert moved.keyring.generations == start.keyring.generations
    event = dict(moved.events)["peer list changed"]
    assert (event["joined"], event["left"], event["moved"]) == (["n5"], ["n4"], ["n1"])


def test_opted_out_unaddressed_ipv6_and_duplicate_ip_nodes_are_left_out(start: Decision) -> None:
    nodes = [
        *NODES,
        NodeInfo("out", "10.0.0.9", opted_out=True),
        NodeInfo("noip", None),
        NodeInfo("six", "fd00::1"),
        NodeInfo("thief", "10.0.0.1"),  # n1 holds 10.0.0.1 in the keyring: n1 keeps it
        NodeInfo("x1", "10.0.0.7"),
        NodeInfo("x2", "10.0.0.7"),  # neither holds it: neither gets it
    ]
    result = step(start, {}, 1, nodes=nodes)
    assert result.keyring.peers == start.keyring.peers
    assert result.keyring.outside == (kr.Peer("out", "10.0.0.9"),)


def test_unknown_node_list_keeps_the_peers(start: Decision) -> None:
    assert not step(start, {}, 1, nodes=None).changed


def rotate(start: Decision, t: float = 100.0) -> list[Decision]:
    """Drive a full rotation with every agent acknowledging each phase at once."""
    decisions = [step(start, ack(start, now=t), t, request="r1")]
    while decisions[-1].state.phase != "idle":
        t += 1
        decisions.append(step(decisions[-1], ack(decisions[-1], now=t), t, request="r1"))
    return decisions


def test_a_requested_rotation_goes_stage_switch_retire_idle(start: Decision) -> None:
    stage, switch, retire, idle = rotate(start)
    old = start.keyring.generation(1)
    assert (stage.state.phase, stage.keyring.sent) == ("stage", 1)
    assert [g.id for g in stage.keyring.generations] == [1, 2]
    assert stage.keyring.generation(1) == old
    new = stage.keyring.generation(2)
    assert new.key != old.key and len(new.key) == 32
    assert (switch.state.phase, switch.keyring.sent) == ("switch", 2)
    assert switch.keyring.generations == (old, new)
    assert (retire.state.phase, retire.keyring.generations) == ("retire", (new,))
    assert idle.state.phase == "idle" and idle.keyring is retire.keyring
    assert [d.keyring.serial for d in (stage, switch, retire)] == [2, 3, 4]
    # The switch's moment, one for every agent: IKE_SAs authenticated before it are stale.
    assert (stage.keyring.sent_since, switch.keyring.sent_since) == (None, 101.0)
    assert retire.keyring.sent_since == 101.0
    assert idle.state.last_rotation == 103.0 and idle.state.handled_request == "r1"
    assert idle.state.history[-1] == {
        "rotation": 1,
        "stage": 100.0,
        "switch": 101.0,
        "retire": 102.0,
        "idle": 103.0,
    }
    # The same request does not rotate again; a new one does.
    assert not step(idle, ack(idle, now=104), 104, request="r1").changed
    assert step(idle, ack(idle, now=104), 104, request="r2").state.phase == "stage"


def test_the_interval_starts_a_rotation(start: Decision) -> None:
    assert step(start, ack(start, now=3599), 3599).state.phase == "idle"
    due = step(start, ack(start, now=3600), 3600)
    assert (
        due.state.phase == "stage" and dict(due.events)["rotation started"]["reason"] == "interval"
    )


@pytest.mark.parametrize("phase", ["stage", "switch", "retire"])
def test_each_phase_waits_for_every_live_agent(start: Decision, phase: str) -> None:
    decisions = rotate(start)
    entered = next(d for d in decisions if d.state.phase == phase)
    index = decisions.index(entered)
    # Three of four agents applied; n4 is live but still on the previous keyring.
    reports = ack(entered, ["n1", "n2", "n3"], now=200)
    reports["n4"] = dataclasses.replace(
        reports["n1"], node="n4", keyring_serial=entered.keyring.serial - 1
    )
    held = step(entered, reports, 200, request="r1")
    assert held.state.phase == phase and not held.changed
    assert held.waiting == ("n4",)
    reports["n4"] = dataclasses.replace(reports["n1"], node="n4")
    moved = step(entered, reports, 201, request="r1")
    assert moved.state.phase == decisions[index + 1].state.phase


def test_switch_waits_for_reauthentication(start: Decision) -> None:
    switch = rotate(start)[1]
    reports = ack(switch, now=200, reauthenticated=False)
    assert step(switch, reports, 200).state.phase == "switch"
    assert step(switch, ack(switch, now=200), 200).state.phase == "retire"


def test_a_newer_serial_than_the_phase_counts_as_done(start: Decision) -> None:
    """A node joining during stage bumps the serial: agents on it have staged too."""
    stage = rotate(start)[0]
    behind = ack(start, now=150)  # every agent live, none has staged yet
    joined = step(stage, behind, 150, nodes=[*NODES, NodeInfo("n5", "10.0.0.5")])
    assert joined.state.phase == "stage" and joined.keyring.serial == stage.keyring.serial + 1
    assert [g.id for g in joined.keyring.generations] == [1, 2] and joined.keyring.sent == 1
    nodes5 = [*NODES, NodeInfo("n5", "10.0.0.5")]
    assert step(joined, ack(joined, now=151), 151, nodes=nodes5).state.phase == "switch"


def test_expired_and_absent_agents_are_reported_and_skipped(start: Decision) -> None:
    stage = rotate(start)[0]
    reports = ack(stage, ["n1", "n2"], now=200)
    reports["n3"] = dataclasses.replace(
        reports["n1"], node="n3", heartbeat=200 - 31, keyring_serial=1
    )
    result = step(stage, reports, 200)
    assert result.expired == ("n3",) and result.absent == ("n4",)
    assert result.state.phase == "switch"
    assert result.state.expired == ("n3",)
    assert ("agent expired, not waiting for it", {"node": "n3"}) in result.events
    assert dict(result.events)["rotation phase switch"]["skipped"] == ["n3", "n4"]


def test_stale_sas_only_towards_expired_peers_do_not_hold_retire(start: Decision) -> None:
    switch = rotate(start)[1]
    reports = ack(switch, ["n1", "n2", "n3"], now=200, reauthenticated=False, stale_peers=("n4",))
    reports["n4"] = dataclasses.replace(reports["n1"], node="n4", heartbeat=100)  # expired
    assert step(switch, reports, 200).state.phase == "retire"
    # Stale towards a live peer does hold it.
    reports["n1"] = dataclasses.replace(reports["n1"], stale_peers=("n4", "n2"))
    assert step(switch, reports, 200).state.phase == "switch"
    # An agent that does not say towards whom is waited for.
    reports["n1"] = dataclasses.replace(reports["n1"], stale_peers=None)
    assert step(switch, reports, 200).waiting == ("n1",)


def test_a_request_during_a_rotation_starts_another_one_afterwards(start: Decision) -> None:
    stage = rotate(start)[0]
    later = stage
    t = 200.0
    while True:
        later = step(later, ack(later, now=t), t, request="r2")
        t += 1
        if later.state.phase == "idle":
            break
    assert later.state.handled_request == "r1"
    again = step(later, ack(later, now=t), t, request="r2")
    assert again.state.phase == "stage" and again.state.rotation == 2
    assert [g.id for g in again.keyring.generations] == [2, 3]


@pytest.mark.parametrize("phase", ["stage", "switch", "retire"])
def test_a_restarted_master_resumes_from_what_it_wrote(start: Decision, phase: str) -> None:
    decisions = rotate(start)
    entered = next(d for d in decisions if d.state.phase == phase)
    following = decisions[decisions.index(entered) + 1]
    # What a new process reads back from the Secret: the two files.
    keyring = kr.loads(kr.dumps(entered.keyring))
    state = loads_state(dumps_state(entered.state))
    assert state == entered.state
    resumed = decide(keyring, state, NODES, ack(entered, now=300), 300, POLICY, "r1")
    assert resumed.state.phase == following.state.phase
    assert resumed.keyring.generations == following.keyring.generations
    assert resumed.keyring.sent == following.keyring.sent


@pytest.mark.parametrize("phase", ["stage", "switch", "retire"])
def test_lost_master_state_is_inferred_from_the_keyring(start: Decision, phase: str) -> None:
    entered = next(d for d in rotate(start) if d.state.phase == phase)
    behind = {n.name: AgentReport(n.name, 300, keyring_serial=0) for n in NODES}
    inferred = decide(entered.keyring, None, NODES, behind, 300, POLICY)
    assert inferred.state.phase == phase and inferred.changed
    assert inferred.keyring.generations == entered.keyring.generations


def test_state_round_trip_and_garbage() -> None:
    state = MasterState(
        phase="switch",
        rotation=3,
        phase_serial=9,
        last_rotation=5.0,
        handled_request="x",
        expired=("n2",),
        history=({"rotation": 3, "stage": 1.0},),
    )
    assert loads_state(dumps_state(state)) == state
    for bad in (None, "", "{", "[]", '{"phase": "dance", "rotation": 1, "phase_serial": 1}'):
        assert loads_state(bad) is None


def test_agent_reports_parse_tolerantly() -> None:
    doc = {
        "node": "n1",
        "updated": 5.5,
        "keyring_serial": 3,
        "sent_generation": 2,
        "generations": {"2": "sent"},
        "reauthenticated": True,
        "stale_ike_sas": 0,
        "stale_peers": ["ov-n2"],
        "peers_up": 3,
        "peers_expected": 3,
        "last_error": None,
    }
    report = AgentReport.from_status(doc)
    assert report is not None
    assert (report.heartbeat, report.keyring_serial, report.stale_peers) == (5.5, 3, ("n2",))
    assert AgentReport.from_status({"node": "n1"}) is None
    assert AgentReport.from_status({"updated": 1}) is None
    odd = AgentReport.from_status({"node": "n1", "updated": 1, "keyring_serial": "3"})
    assert odd is not None and odd.keyring_serial is None


# --- the outside list and the encryption switch ---------------------------------------------


def test_the_outside_list_holds_opted_out_nodes_with_an_ipv4_address_no_peer_holds(
    start: Decision,
) -> None:
    nodes = [
        *NODES,
        NodeInfo("out-b", "10.0.0.9", opted_out=True),
        NodeInfo("out-a", None, opted_out=True),
        NodeInfo("out-c", "fd00::1", opted_out=True),
        NodeInfo("out-d", "10.0.0.1", opted_out=True),  # n1's IP: the guard must drop it
        NodeInfo("out-f", "10.0.0.8", opted_out=True),
        NodeInfo("out-e", "10.0.0.8", opted_out=True),  # one IP twice: the first by name
        NodeInfo("Out-G", "10.0.0.7", opted_out=True),  # not a node name
    ]
    result = step(start, {}, 1, nodes=nodes)
    assert result.keyring.outside == (kr.Peer("out-b", "10.0.0.9"), kr.Peer("out-e", "10.0.0.8"))
    assert result.keyring.serial == 2 and result.keyring.peers == start.keyring.peers
    assert dict(result.events)["outside list changed"] == {
        "joined": ["out-b", "out-e"],
        "left": [],
        "moved": [],
    }
    assert kr.loads(kr.dumps(result.keyring)) == result.keyring
    # n4 opts out: it leaves the peers for the outside list, in one keyring.
    moved = [*NODES[:3], NodeInfo("n4", "10.0.0.4", opted_out=True)]
    again = step(result, {}, 2, nodes=moved)
    assert [p.name for p in again.keyring.peers] == ["n1", "n2", "n3"]
    assert again.keyring.outside == (kr.Peer("n4", "10.0.0.4"),)
    assert again.keyring.serial == 3


def test_the_first_keyring_takes_the_desired_switch_at_once() -> None:
    off = decide(None, None, NODES, {}, 5.0, POLICY, enabled=False)
    assert off.keyring.encryption == kr.Encryption(False, 0.0)
    assert off.keyring.encryption.mode(5.0) == "off"
    assert dict(off.events)["keyring created"]["encryption"] == "off"
    on = decide(None, None, NODES, {}, 5.0, POLICY)
    assert on.keyring.encryption == kr.Encryption(True, 0.0)
    assert step(on, ack(on, now=6), 6, enabled=True).changed is False


def announce(start: Decision, enabled: bool = False, t: float = 10.0) -> Decision:
    announced = step(start, ack(start, now=t), t, enabled=enabled)
    assert announced.keyring.encryption == kr.Encryption(enabled, None)
    return announced


def test_a_switch_is_announced_then_scheduled_once_every_live_agent_has_it(
    start: Decision,
) -> None:
    announced = announce(start)
    assert announced.keyring.serial == 2 and announced.keyring.encryption.mode(10) == "on"
    assert (announced.state.cutover_serial, announced.state.cutover_announced) == (2, 10.0)
    assert dict(announced.events)["encryption switch announced"] == {"enabled": False}
    assert announced.waiting == ("n1", "n2", "n3", "n4")
    # n4 is live but still on the keyring before the announcement.
    reports = ack(announced, ["n1", "n2", "n3"], now=11)
    reports["n4"] = AgentReport("n4", 11, keyring_serial=1)
    held = step(announced, reports, 11, enabled=False)
    assert not held.changed and held.waiting == ("n4",)
    scheduled = step(announced, ack(announced, now=13), 13, enabled=False)
    assert scheduled.keyring.encryption == kr.Encryption(False, 23.0)  # the least lead, 10 s
    assert scheduled.keyring.serial == 3 and scheduled.waiting == ()
    assert scheduled.state.cutover_serial is None and scheduled.state.cutover_announced is None
    assert dict(scheduled.events)["encryption switch scheduled"] == {
        "enabled": False,
        "at": 23.0,
        "lead": 10.0,
        "skipped": [],
    }
    # Still encrypting until the moment; nothing more to publish.
    assert scheduled.keyring.encryption.mode(22.9) == "on"
    assert scheduled.keyring.encryption.mode(23.0) == "off"
    assert not step(scheduled, ack(scheduled, now=30), 30, enabled=False).changed


def test_the_lead_is_twice_the_time_the_acknowledgements_took(start: Decision) -> None:
    announced = announce(start, t=10.0)
    scheduled = step(announced, ack(announced, now=25), 25, enabled=False)
    assert scheduled.keyring.encryption == kr.Encryption(False, 25.0 + 30.0)
    assert dict(scheduled.events)["encryption switch scheduled"]["lead"] == 30.0


def test_a_cutover_skips_expired_and_absent_agents(start: Decision) -> None:
    announced = announce(start)
    reports = ack(announced, ["n1", "n2"], now=50)
    reports["n3"] = AgentReport("n3", 50 - 31, keyring_serial=1)  # expired, behind
    scheduled = step(announced, reports, 50, enabled=False)
    assert scheduled.expired == ("n3",) and scheduled.absent == ("n4",)
    # The acknowledgements took 40 s, but a lead is never above agent_timeout (30 s).
    assert scheduled.keyring.encryption.at == 50.0 + 30.0
    assert dict(scheduled.events)["encryption switch scheduled"]["skipped"] == ["n3", "n4"]


def test_a_cutover_waits_for_an_agent_still_starting_but_not_forever(start: Decision) -> None:
    """Never reported (absent): waited for during agent_timeout after the announcement."""
    announced = announce(start)  # at 10
    early = step(announced, ack(announced, ["n1", "n2", "n3"], now=20), 20, enabled=False)
    assert early.waiting == ("n4",) and early.keyring.encryption.at is None
    late = step(announced, ack(announced, ["n1", "n2", "n3"], now=41), 41, enabled=False)
    assert late.waiting == () and late.keyring.encryption.at == 41.0 + 30.0


def test_a_fresh_install_asked_for_on_starts_with_a_cutover() -> None:
    """enabled=True at creation (the deployed settings): announced, so that the agents
    a rollout starts one by one get ready before any enforces; enabled=None: on at once."""
    fresh = decide(None, None, NODES, {}, 0.0, POLICY, enabled=True)
    assert fresh.keyring.encryption == kr.Encryption(True, None)
    assert (fresh.state.cutover_serial, fresh.state.cutover_announced) == (1, 0.0)
    rolling = step(fresh, ack(fresh, ["n1", "n2"], now=5), 5, enabled=True)
    assert rolling.waiting == ("n3", "n4") and rolling.keyring.encryption.at is None
    ready = step(fresh, ack(fresh, now=8), 8, enabled=True)
    assert ready.keyring.encryption == kr.Encryption(True, 8.0 + 16.0)
    assert decide(None, None, NODES, {}, 0.0, POLICY).keyring.encryption.mode(0.0) == "on"


def test_a_change_of_mind_while_only_announced_reverts_at_once(start: Decision) -> None:
    announced = announce(start)
    reverted = step(announced, ack(start, now=12), 12, enabled=True)
    assert reverted.keyring.encryption == kr.Encryption(True, 12.0)
    assert reverted.keyring.encryption.mode(12.0) == "on"
    assert dict(reverted.events)["encryption switch reverted"] == {"enabled": True}
    assert reverted.state.cutover_serial is None and reverted.keyring.serial == 3
    # The wish unknown (no file): the announcement stands.
    assert step(announced, ack(start, now=12), 12).keyring.encryption.at is None


def test_a_scheduled_switch_runs_to_its_moment_and_a_later_flip_starts_anew(
    start: Decision,
) -> None:
    announced = announce(start)
    scheduled = step(announced, ack(announced, now=13), 13, enabled=False)
    assert not step(scheduled, ack(scheduled, now=20), 20, enabled=True).changed
    again = step(scheduled, ack(scheduled, now=23), 23, enabled=True)
    assert again.keyring.encryption == kr.Encryption(True, None)
    assert again.keyring.encryption.mode(23) == "prepare"
    assert again.state.cutover_serial == again.keyring.serial


def test_no_rotation_starts_during_a_cutover_or_while_off(start: Decision) -> None:
    announced = announce(start, t=3598)  # the interval is due at 3600, and r1 asks
    held = step(announced, ack(announced, now=3600), 3600, request="r1", enabled=False)
    assert held.state.phase == "idle" and held.keyring.encryption.at == 3610.0
    assert step(held, ack(held, now=3605), 3605, request="r1").state.phase == "idle"
    off = step(held, ack(held, now=3610), 3610, request="r1")
    assert off.state.phase == "idle" and not off.changed  # off: nothing to rotate
    on = step(off, ack(off, now=3611), 3611, request="r1", enabled=True)
    assert on.keyring.encryption.at is None and on.state.phase == "idle"
    scheduled = step(on, ack(on, now=3612), 3612, request="r1", enabled=True)
    assert scheduled.keyring.encryption.at == 3622.0 and scheduled.state.phase == "idle"
    due = step(scheduled, ack(scheduled, now=3622), 3622, request="r1", enabled=True)
    assert (
        due.state.phase == "stage" and dict(due.events)["rotation started"]["reason"] == "requested"
    )


def test_no_cutover_starts_during_a_rotation(start: Decision) -> None:
    stage = rotate(start)[0]
    t = 200.0
    decision = stage
    while decision.state.phase != "idle":
        decision = step(decision, ack(decision, now=t), t, enabled=False)
        assert decision.keyring.encryption == kr.Encryption(True, 0.0), decision.state.phase
        t += 1
    announced = step(decision, ack(decision, now=t), t, enabled=False)
    assert announced.keyring.encryption == kr.Encryption(False, None)


def test_a_restarted_master_resumes_an_announced_switch(start: Decision) -> None:
    announced = announce(start)
    state = loads_state(dumps_state(announced.state))
    assert state == announced.state
    keyring = kr.loads(kr.dumps(announced.keyring))
    resumed = decide(keyring, state, NODES, ack(announced, now=12), 12, POLICY, enabled=False)
    assert resumed.keyring.encryption == kr.Encryption(False, 22.0)
    # Lost master state: a retire to finish, then the announcement waits for the keyring
    # as it is, and the moment gets the least lead.
    lost = decide(keyring, None, NODES, ack(announced, now=12), 12, POLICY, enabled=False)
    assert lost.state.phase == "idle" and lost.state.cutover_serial == 2
    assert lost.keyring.encryption.at is None
    found = decide(keyring, lost.state, NODES, ack(announced, now=13), 13, POLICY)
    assert found.keyring.encryption == kr.Encryption(False, 23.0)


# --- node keys ---------------------------------------------------------------------------

PUBS = {f"n{i}": bytes([i]) * 32 for i in range(1, 5)}


def keyed(decision: Decision, names: list[str] | None = None, now: float = 0.0) -> dict:
    """ack() from agents that report their public keys."""
    return {
        name: dataclasses.replace(report, public_key=PUBS[name])
        for name, report in ack(decision, names, now).items()
    }


def test_the_first_generation_binds_to_node_keys_and_reported_keys_are_published(
    start: Decision,
) -> None:
    assert start.keyring.generation(start.keyring.sent).node_keys
    assert all(p.pub is None for p in start.keyring.peers)
    published = step(start, keyed(start, ["n1", "n2"], now=1), 1)
    assert published.keyring.serial == 2
    assert {p.name: p.pub for p in published.keyring.peers} == {
        "n1": PUBS["n1"], "n2": PUBS["n2"], "n3": None, "n4": None,
    }  # fmt: skip
    assert ("node public key added", {"node": "n1"}) in published.events
    # A report without a key (expired Lease, older agent) keeps the key as published.
    kept = step(published, ack(published, now=2), 2)
    assert [p.pub for p in kept.keyring.peers][:2] == [PUBS["n1"], PUBS["n2"]]
    # A new key (the node's key file was lost) replaces the old one.
    reports = keyed(kept, now=3)
    reports["n1"] = dataclasses.replace(reports["n1"], public_key=b"\x09" * 32)
    changed = step(kept, reports, 3)
    assert changed.keyring.peer("n1").pub == b"\x09" * 32  # type: ignore[union-attr]
    assert ("node public key changed", {"node": "n1"}) in changed.events


def test_a_rotation_binds_to_node_keys_only_if_every_live_agent_has_one(start: Decision) -> None:
    published = step(start, keyed(start, now=1), 1)
    older = ack(published, now=2)  # an agent of the previous release reports no key
    older.update({k: v for k, v in keyed(published, ["n1", "n2", "n3"], now=2).items()})
    staged = step(published, older, 2, request="r1")
    new = max(g.id for g in staged.keyring.generations)
    assert not staged.keyring.generation(new).node_keys
    assert (
        "new generation without node keys",
        {"generation": new, "agents_without_key": ["n4"]},
    ) in staged.events
    staged = step(published, keyed(published, now=2), 2, request="r1")
    assert staged.keyring.generation(max(g.id for g in staged.keyring.generations)).node_keys


def test_an_announced_switch_waits_for_the_keyring_with_the_agents_keys() -> None:
    """A fresh install: the agents' first acknowledgements carry their keys, and the keyring
    that publishes them is the one the switch waits for (else it would be scheduled before
    any agent had its peers' keys, and with them its connections)."""
    fresh = decide(None, None, NODES, {}, 0.0, POLICY, enabled=True)
    published = step(fresh, keyed(fresh, now=5), 5, enabled=True)
    assert published.keyring.encryption.at is None and published.keyring.serial == 2
    assert published.state.cutover_serial == 2
    held = step(published, keyed(fresh, now=6), 6, enabled=True)
    assert held.keyring.encryption.at is None and held.waiting == ("n1", "n2", "n3", "n4")
    ready = step(published, keyed(published, now=8), 8, enabled=True)
    assert ready.keyring.encryption.at is not None
