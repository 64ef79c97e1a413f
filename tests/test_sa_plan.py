"""plan_sas: which IKE_SAs to reauthenticate or close, decided without a charon."""

from __future__ import annotations

from ipaddress import ip_address

from overlay_vici.sa_plan import REAUTH_RETRY, IkeSa, Timing, plan_sas

ME, LOW, HIGH = ip_address("10.0.0.5"), ip_address("10.0.0.1"), ip_address("10.0.0.9")
PEERS = {"ov-low": LOW, "ov-high": HIGH}
TIMING = Timing(reauth_delay=2.0, reauth_grace=30.0, resync=30.0)
SWITCH = 1000.0


def sa(uid: str, conn: str, established_at: float, now: float, initiator: bool = True) -> IkeSa:
    return IkeSa(uid, conn, "ESTABLISHED", int(now - established_at), 1, initiator)


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
    assert early.wait == 2.0  # polls until due, at least REAUTH_POLL apart
    due = decide([sa("1", "ov-high", SWITCH - 100, SWITCH + 3)], SWITCH + 3)
    assert [s.unique_id for s in due.reauthenticate] == ["1"]


def test_higher_ip_end_waits_the_grace_period_for_its_peer() -> None:
    now = SWITCH + 10
    assert decide([sa("1", "ov-low", SWITCH - 100, now)], now).reauthenticate == []
    now = SWITCH + 33
    assert len(decide([sa("1", "ov-low", SWITCH - 100, now)], now).reauthenticate) == 1


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
    connecting = IkeSa("1", "ov-high", "CONNECTING", None, 0, True)
    assert decide([connecting], now).stale == []


def test_stale_duplicates_beside_a_fresh_sa_are_closed_not_reauthenticated() -> None:
    """Waiting for the other end's grace period would stall a rotation by 30 s."""
    now = SWITCH + 5
    fresh = sa("3", "ov-high", SWITCH + 2, now)
    stale = sa("2", "ov-high", SWITCH - 50, now, initiator=False)
    result = decide([fresh, stale], now)
    assert result.terminate == [stale] and result.reauthenticate == []
    # The higher end leaves that to the lower end.
    assert (
        decide(
            [sa("3", "ov-low", SWITCH + 2, now), sa("2", "ov-low", SWITCH - 50, now)], now
        ).terminate
        == []
    )
