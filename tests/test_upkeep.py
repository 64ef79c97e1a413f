"""SaUpkeep lists charon's IKE_SAs only when the plan may act on them: decided without a
charon, by a stand-in that answers `stats` and `list-sas` from a table (the real charon's
answers are tested in test_agent_host.py and the UML mesh)."""

from __future__ import annotations

from dataclasses import dataclass, field

from keyring_fixtures import build_keyring

from overlay_vici.agent.sa_plan import IkeSa
from overlay_vici.agent.upkeep import AUDIT_RESYNCS, SaUpkeep
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
