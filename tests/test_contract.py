"""The contracts between the processes (overlay_vici.core.contract) hold at both ends: what
the agent writes is the report the contract describes, the Lease carries a subset of it, and
connection names map back to the peers the master knows."""

from __future__ import annotations

from pathlib import Path

import pytest

from overlay_vici.agent.agent import Agent, AgentConfig
from overlay_vici.agent.charon import Charon
from overlay_vici.agent.render import Settings
from overlay_vici.core.contract import (
    LEASED,
    AgentReport,
    StatusReport,
    conn_name,
    conn_peer,
    is_node_name,
    lease_name,
    leased,
)
from overlay_vici.master.rotation import completed


def test_the_agent_writes_exactly_the_contracts_report(tmp_path: Path) -> None:
    config = AgentConfig(node="n1", secret_dir=tmp_path / "keys", settings=Settings())
    agent = Agent(config, Charon(f"unix://{tmp_path / 'no-charon.vici'}"))
    assert set(agent.status()) == set(StatusReport.__annotations__)


def test_the_lease_carries_a_subset_of_the_report_for_its_node() -> None:
    assert set(LEASED) <= set(StatusReport.__annotations__)
    status = {"node": "spoofed", "updated": 5.0, "guard": {"backend": "legacy"}, "peers_up": 2}
    assert leased(status, "n1") == {"node": "n1", "updated": 5.0, "peers_up": 2}


def test_the_master_reads_the_leased_report() -> None:
    status = {"node": "n1", "updated": 7.5, "keyring_serial": 3, "sent_generation": 2,
              "generations": {"2": "sent"}, "stale_ike_sas": 1,
              "stale_peers": [conn_name("n2")], "peers_up": 1, "peers_expected": 2}  # fmt: skip
    report = AgentReport.from_status(leased(status, "n1"))
    assert report == AgentReport(
        node="n1", heartbeat=7.5, keyring_serial=3, sent_generation=2,
        generations={"2": "sent"}, stale_ike_sas=1, stale_peers=("n2",), peers_up=1,
        peers_expected=2,
    )  # fmt: skip
    assert AgentReport.from_status({"node": "n1", "updated": True}) is None


@pytest.mark.parametrize("name", ["n1", "node-7", "ip-10-0-0-7.ec2.internal", "a" * 253])
def test_connection_names_map_back_to_node_names(name: str) -> None:
    assert is_node_name(name)
    assert conn_peer(conn_name(name)) == name


@pytest.mark.parametrize("name", ["", "N1", "a_b", "-a", "a" * 254, "a\n", None])
def test_what_is_not_a_node_name(name: object) -> None:
    assert not is_node_name(name)


def test_lease_names_are_valid_object_names() -> None:
    assert lease_name("n1") == "overlay-vici-agent-n1"
    assert len(lease_name("a" * 253)) <= 253


def test_a_stale_sa_towards_a_live_dotted_peer_holds_the_switch_back() -> None:
    """Node names with dots (cloud providers' ip-10-0-0-7.ec2.internal) come back from the
    connection names the agent reports, so the master sees the live peer it waits for."""
    doc = {"node": "n1.zone", "updated": 1.0, "keyring_serial": 3, "sent_generation": 2,
           "stale_peers": [conn_name("n2.zone")]}  # fmt: skip
    report = AgentReport.from_status(doc)
    assert report is not None
    assert not completed(report, "switch", 3, sent=2, live={"n1.zone", "n2.zone"})
    assert completed(report, "switch", 3, sent=2, live={"n1.zone"})


def test_the_master_reads_the_same_report_from_a_lease_as_from_the_file() -> None:
    """Every field the master reads crosses the Lease: in Kubernetes mode `status` and the
    switch's bookkeeping see what the agent wrote, not a blank (encryption was missing)."""
    status = {"node": "n1", "updated": 7.5, "keyring_serial": 3, "sent_generation": 2,
              "generations": {"2": "sent"}, "encryption": "on", "reauthenticated": True,
              "stale_ike_sas": 1, "stale_peers": [conn_name("n2")], "peers_up": 1,
              "peers_expected": 2, "last_error": "x"}  # fmt: skip
    assert AgentReport.from_status(leased(status, "n1")) == AgentReport.from_status(status)
