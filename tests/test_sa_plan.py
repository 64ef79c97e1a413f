"""plan_sas: which IKE_SAs to reauthenticate or close, decided without a charon."""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from overlay_vici.agent.sa_plan import (
    INITIATE_BATCH,
    LEAD_REAUTH_RATE,
    REAUTH_AFTER,
    REAUTH_POLL,
    REAUTH_RETRY,
    IkeSa,
    Timing,
    at_rest,
    plan_sas,
)

ME, LOW, HIGH = ip_address("10.0.0.5"), ip_address("10.0.0.1"), ip_address("10.0.0.9")
PEERS = {"ov-low": LOW, "ov-high": HIGH}
TIMING = Timing(reauth_delay=2.0, reauth_grace=30.0, resync=30.0)
SWITCH = 1000.0


def sa(uid: str, conn: str, established_at: float, now: float, initiator: bool = True) -> IkeSa:
    return IkeSa(uid, conn, "ESTABLISHED", int(now - established_at), ("c",), initiator)


def decide(sas: list[IkeSa], now: float, issued: dict[str, float] | None = None):
    return plan_sas(sas, now, SWITCH, ME, PEERS, issued or {}, TIMING)


def test_sas_newer_than_the_switch_are_left_alone() -> None:
    now = SWITCH + 60
    result = decide([sa("1", "ov-high", SWITCH + 5, now)], now)
    assert result.stale == [] and result.reauthenticate == [] and result.terminate == []
    assert result.wait == TIMING.resync


def test_lower_ip_end_reauthenticates_after_its_jitter() -> None:
    old = sa("1", "ov-high", SWITCH - 100, SWITCH + 1)
    early = decide([old], SWITCH + 1)
    assert early.stale == [old] and early.reauthenticate == []
    # Due REAUTH_AFTER + the 2 s jitter after the switch; polls at least REAUTH_POLL apart.
    assert early.wait == REAUTH_AFTER + 2.0 - 1
    due = decide([sa("1", "ov-high", SWITCH - 100, SWITCH + 4)], SWITCH + 4)
    assert [s.unique_id for s in due.reauthenticate] == ["1"]


def test_higher_ip_end_waits_the_grace_period_for_its_peer() -> None:
    now = SWITCH + 10
    assert decide([sa("1", "ov-low", SWITCH - 100, now)], now).reauthenticate == []
    now = SWITCH + REAUTH_AFTER + 33  # jitter 2 + grace 30 + 2 peers' share 0.2
    assert len(decide([sa("1", "ov-low", SWITCH - 100, now)], now).reauthenticate) == 1


def test_in_a_large_mesh_the_higher_end_waits_for_the_lower_ends_queue() -> None:
    """The lowest-IP node of 1,000 needs about 100 s for its 999 reauthentications: a
    higher end stepping in after 30 s would duplicate most of them."""
    peers = {
        **PEERS,
        **{f"ov-n{i}": ip_address(f"10.2.{i // 200}.{i % 200 + 1}") for i in range(998)},
    }
    queue = len(peers) / LEAD_REAUTH_RATE
    early = SWITCH + REAUTH_AFTER + 2 + 30 + queue - 1
    for now, expected in ((early, 0), (early + 2, 1)):
        stale = [sa("1", "ov-low", SWITCH - 100, now)]
        assert len(plan_sas(stale, now, SWITCH, ME, peers, {}, TIMING).reauthenticate) == expected


def test_only_one_reauthentication_per_connection_at_a_time() -> None:
    """Two at once can refuse each other's CHILD_SA as a duplicate and leave none."""
    now = SWITCH + 5
    both = [sa("1", "ov-high", SWITCH - 100, now), sa("2", "ov-high", SWITCH - 50, now)]
    assert len(decide(both, now).reauthenticate) == 1
    assert decide(both, now, issued={"1": now - 1}).reauthenticate == []
    retried = decide(both, now + REAUTH_RETRY, issued={"1": now - 1})
    assert len(retried.reauthenticate) == 1


def test_an_sa_from_the_switch_second_counts_as_stale() -> None:
    """`established` has whole seconds: err towards one reauthentication too many."""
    now = SWITCH + 10.5
    assert len(decide([sa("1", "ov-high", SWITCH + 0.2, now)], now).stale) == 1


def test_duplicates_closed_by_the_lower_end_keeping_its_own() -> None:
    now = SWITCH + 100
    mine = sa("1", "ov-high", SWITCH + 10, now, initiator=True)
    theirs = sa("2", "ov-high", SWITCH + 20, now, initiator=False)
    assert decide([mine, theirs], now).terminate == [theirs]
    # The higher end never closes duplicates: the lower end decides for the pair.
    assert (
        decide(
            [sa("3", "ov-low", SWITCH + 10, now), sa("4", "ov-low", SWITCH + 20, now)], now
        ).terminate
        == []
    )


def test_connecting_sas_are_not_judged() -> None:
    now = SWITCH + 5
    connecting = IkeSa("1", "ov-high", "CONNECTING", None, (), True)
    assert decide([connecting], now).stale == []


def test_a_stale_sa_beside_a_fresh_one_is_retired_not_reauthenticated() -> None:
    """The agent's make-before-break: once the new IKE_SA carries the pair, the stale one is
    retired (its CHILD_SAs, then itself); waiting for the other end's grace period would
    stall a rotation by 30 s."""
    now = SWITCH + 5
    fresh = sa("3", "ov-high", SWITCH + 2, now)
    stale = sa("2", "ov-high", SWITCH - 50, now, initiator=False)
    result = decide([fresh, stale], now)
    assert result.retire == [stale] and result.reauthenticate == [] and result.terminate == []
    assert result.wait == REAUTH_POLL  # the next step closes the childless IKE_SA
    # The higher end leaves that to the lower end, unless the fresh one is its own: it
    # stepped in for the lower end (whose agent is down) and must not start another.
    theirs = sa("3", "ov-low", SWITCH + 2, now, initiator=False)
    waits = decide([theirs, sa("2", "ov-low", SWITCH - 50, now)], now + 40)  # past the grace
    assert waits.retire == [] and waits.reauthenticate == [] and waits.wait == REAUTH_POLL
    mine = sa("3", "ov-low", SWITCH + 40, now + 40)
    stepped_in = decide([mine, sa("2", "ov-low", SWITCH - 50, now + 40)], now + 40)
    assert [s.unique_id for s in stepped_in.retire] == ["2"] and not stepped_in.reauthenticate


def test_a_stale_sa_is_kept_until_the_fresh_one_has_its_child_sa() -> None:
    now = SWITCH + 5
    fresh = IkeSa("3", "ov-high", "ESTABLISHED", 1, (), True)
    stale = sa("2", "ov-high", SWITCH - 50, now)
    result = decide([fresh, stale], now)
    assert result.retire == [] and result.reauthenticate == [] and result.terminate == []
    assert result.wait == REAUTH_POLL


def test_the_higher_end_leaves_an_sa_its_peer_made_around_the_switch_to_the_peer() -> None:
    """Seconds of rounding or clock skew around sent_since: the lower-IP end, which made the
    IKE_SA, judges it; the higher end does not step in and fight its duplicate-closing."""
    now = SWITCH + 60
    theirs = sa("7", "ov-low", SWITCH - 2, now, initiator=False)
    assert decide([theirs], now).stale == []
    mine = sa("7", "ov-low", SWITCH - 2, now)  # one this end made is judged by the moment
    assert decide([mine], now).stale == [mine]
    older = sa("6", "ov-low", SWITCH - 50, now, initiator=False)
    assert decide([older], now).stale == [older]


def test_known_stale_ids_spare_an_sa_the_peer_made_just_after_the_switch() -> None:
    """An SA the peer reauthenticated within a second of this end's switch is fresh when the
    IKE_SAs held at the switch are known; by timestamps alone it would count as stale."""
    now = SWITCH + 5.9
    fresh = sa("9", "ov-high", SWITCH + 0.6, now)  # established_ago truncates to 5 s
    old = sa("1", "ov-high", SWITCH - 100, now)
    by_time = decide([fresh], now)
    assert by_time.stale == [fresh]
    by_ids = plan_sas([fresh], now, SWITCH, ME, PEERS, {}, TIMING, stale_ids=frozenset({"1"}))
    assert by_ids.stale == [] and by_ids.reauthenticate == []
    both = plan_sas([old, fresh], now, SWITCH, ME, PEERS, {}, TIMING, stale_ids=frozenset({"1"}))
    assert both.stale == [old]


def test_pending_initiation_waits_then_initiates_unless_an_ike_sa_exists() -> None:
    due = {"ov-low": SWITCH + 2, "ov-high": SWITCH + 2}
    early = plan_sas([], SWITCH + 1, 0.0, ME, PEERS, {}, TIMING, due)
    assert early.initiate == [] and early.wait == 1.0
    connecting = IkeSa("3", "ov-high", "CONNECTING", None, (), False)
    late = plan_sas([connecting], SWITCH + 2, 0.0, ME, PEERS, {}, TIMING, due)
    assert late.initiate == ["ov-low"] and late.settled == ["ov-high"]


def test_initiations_are_paced_earliest_first_and_the_next_pass_comes_at_once() -> None:
    """A lowest-IP node's hundreds of initiations go a batch a pass, not in one burst."""
    due = {f"ov-n{i:04}": SWITCH - i for i in range(INITIATE_BATCH + 10)}
    first = plan_sas([], SWITCH, 0.0, ME, PEERS, {}, TIMING, due)
    assert len(first.initiate) == INITIATE_BATCH and first.wait == 0.0
    assert first.initiate[0] == f"ov-n{INITIATE_BATCH + 9:04}"  # the longest due
    rest = {conn: when for conn, when in due.items() if conn not in first.initiate}
    second = plan_sas([], SWITCH, 0.0, ME, PEERS, {}, TIMING, rest)
    assert sorted(second.initiate) == sorted(rest) and second.wait == TIMING.resync


def test_sas_on_an_old_address_are_closed_from_either_end() -> None:
    """A node's IP changed: its IKE_SAs on the old address go, whatever the IP order."""
    now = SWITCH + 60
    moved_peer = IkeSa("1", "ov-high", "ESTABLISHED", 50, ("c",), True, "10.0.0.5", "10.0.0.99")
    moved_self = IkeSa("2", "ov-low", "CONNECTING", None, (), True, "10.0.0.55", "10.0.0.1")
    current = IkeSa("3", "ov-high", "ESTABLISHED", 5, ("c",), False, "10.0.0.5", "10.0.0.9")
    result = decide([moved_peer, moved_self, current], now)
    assert result.moved == [moved_peer, moved_self]
    assert result.terminate == [] and result.stale == []


def orphan_case(age: int, last_in: tuple[int | None, int | None]) -> list[IkeSa]:
    """Two IKE_SAs of ov-low as seen by ME (the higher-IP end of that pair)."""
    real = IkeSa("5", "ov-low", "ESTABLISHED", age, ("c",), True, last_in_ago=last_in[0])
    orphan = IkeSa("6", "ov-low", "ESTABLISHED", age + 1, ("c",), False, last_in_ago=last_in[1])
    return [real, orphan]


def test_the_higher_ip_end_closes_a_lasting_duplicate_nothing_arrives_on() -> None:
    """Both ends initiated; the lower-IP end destroyed its half on INITIAL_CONTACT: the
    higher end keeps an orphan. Once the duplicate lasted resync + REAUTH_POLL, it goes."""
    grace = int(TIMING.resync + REAUTH_POLL)
    now = SWITCH + 600
    result = plan_sas(orphan_case(grace, (0, None)), now, SWITCH, ME, PEERS, {}, TIMING)
    assert [sa.unique_id for sa in result.orphans] == ["6"]
    assert result.terminate == [] and result.stale == []


@pytest.mark.parametrize(
    ("age", "last_in"),
    [(5, (0, None)), (100, (None, None)), (100, (0, 1))],
    ids=["too young: the lower end may still act", "no traffic at all", "both in use"],
)
def test_no_orphan_is_guessed(age: int, last_in: tuple[int | None, int | None]) -> None:
    now = SWITCH + 600
    result = plan_sas(orphan_case(age, last_in), now, SWITCH, ME, PEERS, {}, TIMING)
    assert result.orphans == []


def test_the_lower_ip_end_keeps_its_own_duplicate_rule() -> None:
    now = SWITCH + 600
    a = IkeSa("1", "ov-high", "ESTABLISHED", 100, ("c",), True, last_in_ago=None)
    b = IkeSa("2", "ov-high", "ESTABLISHED", 90, ("c",), False, last_in_ago=0)
    result = plan_sas([a, b], now, SWITCH, ME, PEERS, {}, TIMING)
    assert result.orphans == [] and result.terminate == [b]


def test_at_rest_only_with_one_settled_ike_sa_per_peer_and_nothing_due() -> None:
    now = SWITCH + 60
    settled = [sa("1", "ov-high", SWITCH + 5, now), sa("2", "ov-low", SWITCH + 5, now, False)]
    assert at_rest(settled, decide(settled, now), TIMING.resync)
    connecting = IkeSa("3", "ov-high", "CONNECTING", None, (), True)
    childless = IkeSa("4", "ov-high", "ESTABLISHED", 5, (), True)
    duplicate = sa("5", "ov-low", SWITCH + 9, now, False)
    for busy in ([*settled, duplicate], [settled[1], connecting], [settled[1], childless]):
        assert not at_rest(busy, decide(busy, now), TIMING.resync)
    stale = [sa("6", "ov-high", SWITCH - 50, now)]  # to reauthenticate
    assert not at_rest(stale, decide(stale, now), TIMING.resync)


def test_reauthentications_share_the_batch_with_initiations() -> None:
    """After a switch the lowest-IP end has a stale IKE_SA with every peer: a batch a pass."""
    now = SWITCH + 60
    count = INITIATE_BATCH + 36
    peers = {f"ov-n{i:04}": ip_address(f"10.1.{i // 200}.{i % 200 + 1}") for i in range(count)}
    stale = [sa(str(i), conn, SWITCH - 50, now) for i, conn in enumerate(peers)]
    due = {"ov-new": now - 1}
    first = plan_sas(stale, now, SWITCH, ME, {**peers, "ov-new": HIGH}, {}, TIMING, due)
    assert first.initiate == ["ov-new"] and len(first.reauthenticate) == INITIATE_BATCH - 1
    assert first.wait == 0.0 and len(first.stale) == count
