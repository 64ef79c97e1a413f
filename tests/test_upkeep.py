"""SaUpkeep lists charon's IKE_SAs only when the plan may act on them: decided without a
charon, by a stand-in that answers `stats` and `list-sas` from a table (the real charon's
answers are tested in test_agent_host.py and the UML mesh)."""

from __future__ import annotations

from dataclasses import dataclass, field

from keyring_fixtures import build_keyring

from overlay_vici.agent.sa_plan import IkeSa
from overlay_vici.agent.upkeep import AUDIT_RESYNCS, AUDIT_WATCHED, SaUpkeep
from overlay_vici.core.contract import conn_name

RESYNC = 30.0


@dataclass
class Table:
    """charon's IKE_SAs as the upkeep sees them; counts its list-sas."""

    sas: list[IkeSa] = field(default_factory=list)
    lists: int = 0

    def ike_sa_count(self) -> tuple[int, int]:
        return len(self.sas), 0

    def ike_sas(self) -> list[IkeSa]:
        self.lists += 1
        return list(self.sas)


def settled_upkeep(table: Table) -> SaUpkeep:
    keyring = build_keyring(3)
    upkeep = SaUpkeep("node-0", table, lambda *a, **k: None, 0.0, 30.0, RESYNC, {})  # type: ignore[arg-type]
    upkeep.applied(keyring, None)
    upkeep.sent_since = 0.0
    table.sas = [
        IkeSa(str(i), conn_name(f"node-{i}"), "ESTABLISHED", 100, (f"c{i}",), True) for i in (1, 2)
    ]
    upkeep.maintain(True, changed=True)
    return upkeep


def test_at_rest_and_unchanged_the_ike_sas_are_not_listed_again() -> None:
    table = Table()
    upkeep = settled_upkeep(table)
    assert table.lists == 1  # that pass found rest
    for _ in range(3):
        assert upkeep.maintain(True, changed=False) == RESYNC
    assert table.lists == 1 and len(upkeep.sas) == 2


def test_a_change_in_charons_count_or_the_agents_own_lists_again() -> None:
    table = Table()
    upkeep = settled_upkeep(table)
    upkeep.maintain(True, changed=False)
    lists = table.lists
    table.sas = table.sas[:1]  # a peer's IKE_SA went: `stats` counts one fewer
    upkeep.maintain(True, changed=False)
    assert table.lists == lists + 1 and len(upkeep.sas) == 1
    upkeep.maintain(True, changed=True)  # the agent sent charon something
    assert table.lists == lists + 2


def test_at_rest_the_ike_sas_are_still_audited_every_few_resyncs(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    table = Table()
    upkeep = settled_upkeep(table)
    upkeep.maintain(True, changed=False)
    lists = table.lists
    later = upkeep._listed_at + AUDIT_RESYNCS * RESYNC
    monkeypatch.setattr("overlay_vici.agent.upkeep.time.monotonic", lambda: later)
    upkeep.maintain(True, changed=False)
    assert table.lists == lists + 1


@dataclass
class Events:
    """EventWatcher.sa_token as the upkeep reads it."""

    token: tuple[int, int] | None = (1, 0)

    def sa_token(self) -> tuple[int, int] | None:
        return self.token


def watched_upkeep(table: Table, events: Events) -> SaUpkeep:
    upkeep = settled_upkeep(table)
    upkeep.events = events  # type: ignore[assignment]
    upkeep.maintain(True, changed=False)  # the first token differs from none: one list
    return upkeep


def test_an_sa_event_lists_again_though_the_counts_are_the_same() -> None:
    """A peer's reauthentication replaces its IKE_SA: `stats` counts the same, the event
    tells."""
    table, events = Table(), Events()
    upkeep = watched_upkeep(table, events)
    lists = table.lists
    upkeep.maintain(True, changed=False)
    assert table.lists == lists
    table.sas = [IkeSa("9", conn_name("node-1"), "ESTABLISHED", 5, ("c9",), True), table.sas[1]]
    events.token = (1, 1)
    upkeep.maintain(True, changed=False)
    assert table.lists == lists + 1 and upkeep.sas[0].unique_id == "9"


def test_with_events_the_audit_waits_longer_and_without_them_falls_back(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    table, events = Table(), Events()
    upkeep = watched_upkeep(table, events)
    lists = table.lists
    later = upkeep._listed_at + AUDIT_RESYNCS * RESYNC
    monkeypatch.setattr("overlay_vici.agent.upkeep.time.monotonic", lambda: later)
    upkeep.maintain(True, changed=False)
    assert table.lists == lists  # the event subscription vouches for the quiet
    events.token = None  # the subscription dropped: nothing is vouched for
    upkeep.maintain(True, changed=False)
    assert table.lists == lists + 1
    upkeep.maintain(True, changed=False)
    assert table.lists == lists + 1  # back on `stats` and AUDIT_RESYNCS
    events.token = (2, 0)  # subscribed again: events may have been missed meanwhile
    upkeep.maintain(True, changed=False)
    assert table.lists == lists + 2
    much_later = later + AUDIT_WATCHED
    monkeypatch.setattr("overlay_vici.agent.upkeep.time.monotonic", lambda: much_later)
    upkeep.maintain(True, changed=False)
    assert table.lists == lists + 3
