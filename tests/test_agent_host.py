"""The agent against a real charon 5.9.8 on this host (no kernel SAs needed).

Each test starts its own charon with the rendered strongswan.conf, in private mount and
network namespaces: charon's pid file is hard-coded to /var/run/charon.pid (so two
charons cannot share a /run) and its trap policies then stay out of the host's XFRM
tables. The agent is driven through Agent.step() (or Agent.run() for the watcher path)
and charon's state is checked over a separate VICI session.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from charon_process import CHARON, CharonProcess
from keyring_fixtures import build_keyring, node_ip

from overlay_vici.agent import agent as agent_module
from overlay_vici.agent.agent import Agent, AgentConfig
from overlay_vici.agent.charon import Charon
from overlay_vici.agent.render import Settings, conn_name, secret_id
from overlay_vici.agent.sa_plan import INITIATE_BATCH, INITIATE_GRACE, IkeSa
from overlay_vici.core.contract import KEYRING_FILE
from overlay_vici.core.files import publish_secret, write_json
from overlay_vici.core.keyring import Encryption, Keyring, Peer, dumps

NODE = "node-0"

pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHARON) and shutil.which("unshare") and os.geteuid() == 0),
    reason="needs strongSwan's charon, unshare and root (private namespaces per charon)",
)


@pytest.fixture
def charon() -> Iterator[CharonProcess]:
    work = Path(tempfile.mkdtemp(prefix="ov-charon-"))  # short: AF_UNIX paths max 107 bytes
    process = CharonProcess(work)
    process.start()
    try:
        yield process
    finally:
        process.kill()
        shutil.rmtree(work, ignore_errors=True)


class RecordingCharon(Charon):
    """The product's VICI edge, recording each request it makes (names and messages)."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri, timeout=10)
        self.log: list[tuple[str, dict[str, Any] | None]] = []

    def request(self, command: str, message: dict[str, Any] | None = None) -> dict[str, Any]:
        self.log.append((command, message))
        return super().request(command, message)

    def ike_sas(self) -> list[IkeSa]:
        self.log.append(("list-sas", None))
        return super().ike_sas()


@dataclass
class Harness:
    agent: Agent
    charon: RecordingCharon
    keys: Path
    status: Path

    def publish(self, keyring: Keyring | str | bytes) -> None:
        text = dumps(keyring) if isinstance(keyring, Keyring) else keyring
        if isinstance(text, bytes):
            text = text.decode("latin-1")
        publish_secret(self.keys, {KEYRING_FILE: text})

    def step(self) -> list[str]:
        """One Agent.step(); returns the VICI commands it sent, in order."""
        before = len(self.charon.log)
        self.agent.step()
        return [command for command, _ in self.charon.log[before:]]

    def status_doc(self) -> dict[str, Any]:
        return json.loads(self.status.read_text())


def expected(keyring: Keyring) -> tuple[set[str], set[str]]:
    peers = [p.name for p in keyring.peers if p.name != NODE]
    return (
        {conn_name(p) for p in peers},
        {secret_id(p, g.id) for p in peers for g in keyring.generations},
    )


@pytest.fixture
def harness(charon: CharonProcess, tmp_path: Path) -> Iterator[Harness]:
    recording = RecordingCharon(charon.uri)
    config = AgentConfig(
        node=NODE,
        secret_dir=tmp_path / "keys",
        settings=Settings(),
        conf_out=tmp_path / "swanctl.conf",
        status_path=tmp_path / "status.json",
        resync_seconds=60,
    )
    yield Harness(Agent(config, recording), recording, tmp_path / "keys", tmp_path / "status.json")
    recording.close()


def assert_one_sentence(message: str | None) -> None:
    assert message
    assert "\n" not in message
    assert not re.search(r"[.!?]\s+[A-Z]", message), message


QUERIES = ["get-conns", "get-shared"]
LIST = ["stats", "list-sas"]  # what the upkeep asks before it plans (upkeep.SaUpkeep._list)


# --- steady state -------------------------------------------------------------------------


def test_steady_state_never_resends_everything(charon: CharonProcess, tmp_path: Path) -> None:
    """Many passes with nothing changed send no load at all, only the queries.

    Regression: the agent used to take any change of charon's `stats` uptime "since" as a
    restart; that value jitters by one second twice a second (wall clock minus monotonic
    uptime, both truncated), so a random share of passes reloaded every key and conn.
    """
    recording = RecordingCharon(charon.uri)
    agent = Agent(AgentConfig(NODE, tmp_path / "keys", Settings(), resync_seconds=60), recording)
    publish_secret(tmp_path / "keys", {KEYRING_FILE: dumps(build_keyring(20))})
    agent.step()
    reloads = 0
    deadline = time.monotonic() + 2.2
    while time.monotonic() < deadline:
        before = len(recording.log)
        agent.step()
        reloads += any(c.startswith("load") for c, _ in recording.log[before:])
        time.sleep(0.01)
    recording.close()
    assert reloads == 0, f"{reloads} steps reloaded all 60 messages with nothing changed"


# --- first load, additions, removals -------------------------------------------------------


def test_first_step_loads_exactly_the_keyring(harness: Harness, charon: CharonProcess) -> None:
    """An empty charon ends up with one conn per peer and a key per peer and generation."""
    keyring = build_keyring(4, generations=(1, 2))
    harness.publish(keyring)
    commands = harness.step()
    assert harness.agent.last_error is None
    assert charon.state() == expected(keyring)
    # Node 0 has the lowest IP, so it brings every connection up at once.
    assert commands == [
        *QUERIES,
        *["load-shared"] * 6,
        *["load-conn"] * 3,
        *LIST,
        *["initiate"] * 3,
    ]
    status = harness.status_doc()
    assert status["last_error"] is None and status["keyring_serial"] == 1
    assert status["peers_expected"] == 3 and status["generations"] == {"1": "sent", "2": "accepted"}


def test_loaded_connection_is_what_the_template_says(
    harness: Harness, charon: CharonProcess
) -> None:
    """charon's own view of a loaded conn: pinned addresses, IKEv2, one transport child."""
    harness.publish(build_keyring(3))
    harness.step()
    conn = charon.conn_details("ov-node-2")
    assert conn["local_addrs"] == [node_ip(0).encode()]
    assert conn["remote_addrs"] == [node_ip(2).encode()]
    assert conn["version"] == b"IKEv2"
    (child,) = conn["children"].values()
    assert child["mode"] == b"TRANSPORT"
    assert child["local-ts"] == child["remote-ts"] == [b"dynamic[ipencap]"]


def test_second_step_in_sync_sends_nothing(harness: Harness) -> None:
    """Nothing changed: only the three queries and list-sas, no load or unload."""
    harness.publish(build_keyring(5))
    harness.step()
    assert harness.step() == [*QUERIES, *LIST]


def _add_one_peer_cost(harness: Harness, peers: int) -> tuple[int, list[str]]:
    harness.publish(build_keyring(peers, serial=peers))
    while "initiate" in harness.step():  # the initiations go a batch a step
        pass
    harness.publish(build_keyring(peers + 1, serial=peers + 1))
    before = harness.charon.messages
    commands = harness.step()
    return harness.charon.messages - before, commands


def test_adding_a_peer_costs_constant_messages(harness: Harness, charon: CharonProcess) -> None:
    """One new peer is one load-conn and its keys, the same count at 10 and at 200 peers."""
    small, small_commands = _add_one_peer_cost(harness, 10)
    assert charon.state() == expected(build_keyring(11))
    large, large_commands = _add_one_peer_cost(harness, 200)
    assert charon.state() == expected(build_keyring(201))
    assert small == large == len(small_commands) == len(QUERIES) + len(LIST) + 4
    assert small_commands == large_commands == [
        *QUERIES, "load-shared", "load-shared", "load-conn", *LIST, "initiate",
    ]  # fmt: skip
    assert harness.agent.last_error is None


def test_a_lowest_ip_node_initiates_a_batch_a_step(harness: Harness) -> None:
    """Two batches and 22 peers to initiate: over three steps that follow at once, each
    with the status written, never one step holding charon for all of them."""
    peers = 2 * INITIATE_BATCH + 22
    harness.publish(build_keyring(peers + 1))
    batches, waits = [], []
    for _ in range(4):
        before = len(harness.charon.log)
        waits.append(harness.agent.step())
        batches.append([c for c, _ in harness.charon.log[before:]].count("initiate"))
    assert batches == [INITIATE_BATCH, INITIATE_BATCH, 22, 0]
    assert waits[:2] == [0.0, 0.0] and waits[3] > 0
    assert {m["ike"] for c, m in harness.charon.log if c == "initiate"} == {
        conn_name(f"node-{i}") for i in range(1, peers + 1)
    }
    assert harness.agent.last_error is None


def test_the_ike_sas_read_off_the_wire_match_the_vici_packages_decode(
    harness: Harness, charon: CharonProcess
) -> None:
    """Charon.ike_sas decodes list-sas itself (sa_wire); against a real charon holding
    IKE_SAs it reads what the vici package's full decode says, SA for SA."""
    harness.publish(build_keyring(6))
    harness.step()  # node 0 leads: five IKE_SAs under way
    with charon.session() as session:
        events = list(session.streamed_request("list-sas", "list-sa", {"noblock": "yes"}))
    full = {
        sa["uniqueid"].decode(): (conn, sa["state"].decode(), sa["remote-host"].decode())
        for event in events
        for conn, sa in event.items()
    }
    ours = {
        sa.unique_id: (sa.conn, sa.state, sa.remote_host) for sa in Charon(charon.uri).ike_sas()
    }
    assert len(ours) == 5 and ours == full


def test_a_long_step_keeps_its_status_fresh(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step loading thousands of messages writes its status meanwhile (HEARTBEAT), so
    that the master does not expire the agent mid-step; here every load, with the beat at 0."""
    monkeypatch.setattr(agent_module, "HEARTBEAT", 0.0)
    writes: list[Any] = []
    real = agent_module.write_json
    monkeypatch.setattr(
        agent_module, "write_json", lambda path, doc: writes.append(doc) or real(path, doc)
    )
    harness.publish(build_keyring(4))
    commands = harness.step()
    loads = sum(c.startswith("load") for c in commands)
    assert loads == 9 and len(writes) == loads + 1
    assert [w["keyring_serial"] for w in writes] == [None] * loads + [1]  # not yet applied


def test_after_a_charon_restart_the_heartbeat_reports_none_of_the_old_sas(
    harness: Harness, charon: CharonProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reload after a restart is a long step at 1,000 peers; the status it writes
    meanwhile must not show the dead charon's IKE_SAs (the UML bench at N=1000 once read
    "999 up" 10 s after a SIGKILL while the new charon held about 30)."""
    harness.publish(build_keyring(4))  # node-0 has the lowest IP: it initiates all three
    for _ in range(3):
        harness.step()
    assert harness.status_doc()["ike_sas"] == 3
    charon.kill()
    charon.start()
    monkeypatch.setattr(agent_module, "HEARTBEAT", 0.0)
    writes: list[Any] = []
    real = agent_module.write_json
    monkeypatch.setattr(
        agent_module, "write_json", lambda path, doc: writes.append(doc) or real(path, doc)
    )
    harness.step()
    during = writes[:-1]  # the heartbeats, one per load
    assert during and all(w["ike_sas"] == 0 and w["peers_up"] == 0 for w in during)


def test_removing_a_peer_unloads_it(harness: Harness, charon: CharonProcess) -> None:
    """A peer gone from the keyring loses its conn and keys; nothing else is touched."""
    harness.publish(build_keyring(6))
    harness.step()
    smaller = build_keyring((0, 1, 2, 4, 5), serial=2)
    harness.publish(smaller)
    commands = harness.step()
    assert charon.state() == expected(smaller)
    loads = [c for c in commands if c.startswith(("load", "unload"))]
    assert loads == ["unload-conn", "unload-shared", "unload-shared"]
    assert harness.agent.last_error is None


def test_operator_connections_and_keys_survive(harness: Harness, charon: CharonProcess) -> None:
    """An operator's own conn and key (no ov- prefix) stay loaded through add and remove."""
    with charon.session() as session:
        session.load_conn({"site": {"remote_addrs": ["192.0.2.9"], "local": {"auth": "psk"}}})
        session.load_shared({"id": "ike-site", "type": "ike", "data": "s", "owners": ["x"]})
    harness.publish(build_keyring(3))
    harness.step()
    harness.publish(build_keyring(2, serial=2))
    harness.step()
    conns, keys = charon.state()
    assert conns == {"site", "ov-node-1"}
    assert keys == {"ike-site", secret_id("node-1", 1), secret_id("node-1", 2)}


# --- the cluster-wide switch ---------------------------------------------------------------


def _switched(keyring: Keyring, enabled: bool, at: float | None, serial: int) -> Keyring:
    return replace(keyring, encryption=Encryption(enabled, at), serial=serial)


def _start_actions(harness: Harness) -> set[str]:
    """The start_action of the conns the last step loaded (charon's list-conns omits it)."""
    last = [m for c, m in harness.charon.log if c == "load-conn" and m][-3:]
    return {
        child["start_action"] for m in last for c in m.values() for child in c["children"].values()
    }


def test_switch_prepare_then_on_then_off(harness: Harness, charon: CharonProcess) -> None:
    """Announced: keys and untrapped conns, brought up. At the moment: trapped conns (only
    those without an IKE_SA are initiated again). Disabled at its moment: charon holds
    nothing of ours."""
    keyring = build_keyring(4)
    at = time.time() + 1.0
    harness.publish(_switched(keyring, True, None, 1))
    commands = harness.step()
    assert charon.state() == expected(keyring)
    # Brought up at once (node-0 has the lowest IP), without a trap: nothing enforced yet.
    assert commands.count("initiate") == 3 and harness.status_doc()["encryption"] == "prepare"
    assert _start_actions(harness) == {"none"}

    harness.publish(_switched(keyring, True, at, 2))
    assert harness.agent.step() <= at - time.time() + 0.01  # wakes at the moment
    time.sleep(max(0.0, at - time.time()))
    commands = harness.step()
    # The IKE_SAs prepare initiated still exist (connecting, on this host): none again.
    assert commands.count("load-conn") == 3 and "initiate" not in commands
    assert "load-shared" not in commands  # the keys were ready
    assert _start_actions(harness) == {"trap"}
    assert harness.status_doc()["encryption"] == "on"

    harness.publish(_switched(keyring, False, time.time(), 3))
    harness.step()
    assert charon.state() == (set(), set())
    status = harness.status_doc()
    assert status["encryption"] == "off" and status["keyring_serial"] == 3
    assert status["last_error"] is None and status["peers_expected"] == 0


def test_node_outside_the_mesh_loads_nothing(harness: Harness, charon: CharonProcess) -> None:
    """An opted-out node's own agent is off whatever the switch says."""
    mesh = build_keyring((1, 2, 3))
    harness.publish(replace(mesh, outside=(Peer(NODE, node_ip(0)),)))
    harness.step()
    assert charon.state() == (set(), set())
    assert harness.agent.last_error is None and harness.status_doc()["encryption"] == "off"


def test_a_removal_notice_switches_the_node_off_until_withdrawn(
    harness: Harness, charon: CharonProcess, tmp_path: Path
) -> None:
    """report-lease writes the notice when the DaemonSet is deleted (kubectl delete -f):
    Agent.run() wakes on it, unloads everything whatever the keyring says, and loads it all
    again if the notice goes (the DaemonSet came back)."""
    notice = tmp_path / "run" / "removed.json"
    agent = Agent(replace(harness.agent.config, removal_notice=notice), harness.charon)
    keyring = build_keyring(4)
    harness.publish(keyring)
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert _eventually(lambda: charon.state() == expected(keyring), 5)
        written = time.time()
        write_json(notice, {"at": written, "daemonset": "overlay-vici-agent"})
        assert _eventually(lambda: charon.state() == (set(), set()), 5)  # resync is 60 s
        status = harness.status_doc()
        assert status["encryption"] == "off" and status["removed_at"] == written
        assert status["last_error"] is None
        notice.unlink()
        assert _eventually(lambda: charon.state() == expected(keyring), 5)
        assert harness.status_doc()["removed_at"] is None
    finally:
        stop.set()
        thread.join(timeout=10)


def test_an_agent_stopped_before_it_saw_the_notice_still_acts_on_it(
    harness: Harness, charon: CharonProcess, tmp_path: Path
) -> None:
    """kubelet's SIGTERM can beat the agent's look at a fresh notice: the last pass on the
    way out removes the guard and unloads, or nothing would ever undo the guard."""
    keyring = build_keyring(4)
    harness.publish(keyring)
    harness.step()
    assert charon.state() == expected(keyring)
    notice = tmp_path / "removed.json"
    write_json(notice, {"at": time.time(), "daemonset": "overlay-vici-agent"})
    stopped = threading.Event()
    stopped.set()
    Agent(replace(harness.agent.config, removal_notice=notice), harness.charon).run(stopped)
    assert charon.state() == (set(), set())
    assert harness.status_doc()["encryption"] == "off"


def test_stale_means_authenticated_before_the_masters_switch_moment(harness: Harness) -> None:
    """An agent that sees the switch late still counts from the master's moment, so that it
    does not reauthenticate again what its lower-IP peer made after the switch."""
    keyring = build_keyring(3, generations=(1, 2), sent=1)
    harness.publish(keyring)
    harness.step()
    moment = time.time() - 20  # the master switched 20 s before this agent saw it
    harness.publish(replace(keyring, sent=2, serial=2, sent_since=moment))
    harness.step()
    assert harness.status_doc()["sent_since"] == moment


def test_sent_generation_switch_reloads_keys_with_new_owners(harness: Harness) -> None:
    """Switching sent 1 -> 2 resends every key (owners swap roles) and every connection
    (render.ike_rand_time), and unloads nothing."""
    harness.publish(build_keyring(4, generations=(1, 2), sent=1))
    harness.step()
    harness.publish(build_keyring(4, generations=(1, 2), sent=2, serial=2))
    before = len(harness.charon.log)
    messages_before = harness.charon.messages
    harness.step()
    sent = harness.charon.log[before:]
    assert harness.charon.messages - messages_before == len(QUERIES) + 6 + 3 + len(LIST)
    loads = {m["id"]: m["owners"] for c, m in sent if c == "load-shared" and m}
    assert set(loads) == {secret_id(f"node-{i}", g) for i in (1, 2, 3) for g in (1, 2)}
    for i in (1, 2, 3):
        assert loads[secret_id(f"node-{i}", 2)] == [node_ip(i)]
        assert loads[secret_id(f"node-{i}", 1)] == [f"{node_ip(i)}/32"]
    assert sorted(m and next(iter(m)) for c, m in sent if c == "load-conn") == [
        conn_name(f"node-{i}") for i in (1, 2, 3)
    ]
    assert not any(c.startswith("unload") for c, _ in sent)
    assert harness.status_doc()["generations"] == {"1": "accepted", "2": "sent"}


def test_dotted_node_names_load_over_vici(harness: Harness, charon: CharonProcess) -> None:
    """Node names with dots (common in clouds) load fine over VICI, unlike via swanctl."""
    keyring = build_keyring(3)
    dotted = Keyring(
        1,
        keyring.sent,
        keyring.generations,
        tuple(type(p)(p.name if p.name == NODE else f"{p.name}.internal", p.ip)
              for p in keyring.peers),
    )  # fmt: skip
    harness.publish(dotted)
    harness.step()
    assert harness.agent.last_error is None
    assert charon.state() == expected(dotted)


def test_conf_out_holds_the_rendered_file_mode_0600(harness: Harness, tmp_path: Path) -> None:
    """--conf-out gets the swanctl.conf the agent loaded, readable by root only."""
    harness.publish(build_keyring(3))
    harness.step()
    conf = tmp_path / "swanctl.conf"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    assert "ov-node-2 {" in conf.read_text()


def test_charon_refusing_a_conn_is_reported_and_retried(
    charon: CharonProcess, tmp_path: Path
) -> None:
    """A proposal charon cannot parse: keys load, each refused conn is named in last_error,
    the keyring is not marked applied, and the next step tries those conns again."""
    recording = RecordingCharon(charon.uri)
    settings = Settings(ike_proposals="nosuchcipher-sha256")
    agent = Agent(AgentConfig(NODE, tmp_path / "keys", settings), recording)
    keyring = build_keyring(3)
    publish_secret(tmp_path / "keys", {KEYRING_FILE: dumps(keyring)})
    agent.step()
    assert agent.last_error is not None
    assert agent.last_error.startswith("charon refused load-conn for ov-node-1: ")
    assert "ov-node-2" in agent.last_error
    assert charon.state() == (set(), expected(keyring)[1])
    assert agent.applied is None and agent.status()["keyring_serial"] is None
    before = len(recording.log)
    agent.step()
    assert [c for c, _ in recording.log[before:]].count("load-conn") == 2
    recording.close()


# --- bad keyrings keep charon as it was -------------------------------------------------------


def _bad(kind: str, good: Keyring) -> str | bytes:
    text = dumps(good)
    return {
        "garbage": "\x00\x01 this is not json \xff",
        "truncated": text[: len(text) // 3],
        "10 MB": text + " " * (10 * 1024 * 1024),
        "missing node": dumps(build_keyring((1, 2, 3), serial=5)),
        "wrong version": text.replace('"version": 1', '"version": 7'),
        "empty": "",
    }[kind]


BAD_CASES = {
    "garbage": "keyring is not valid JSON",
    "truncated": "keyring is not valid JSON",
    "10 MB": "over the 1048576-byte limit",
    "missing node": "node node-0 is not in the keyring's peer list",
    "wrong version": "keyring format version 7 is not supported",
    "empty": "keyring is empty",
}


@pytest.mark.parametrize("kind", list(BAD_CASES))
def test_bad_keyring_is_one_sentence_and_charon_unchanged(
    harness: Harness, charon: CharonProcess, kind: str
) -> None:
    """A rejected keyring: last_error says why in one sentence, charon keeps the last good."""
    good = build_keyring(4)
    harness.publish(good)
    harness.step()
    state = charon.state()
    harness.publish(_bad(kind, good))
    commands = harness.step()
    error = harness.agent.last_error
    assert error is not None and BAD_CASES[kind] in error
    assert error.endswith("keeping keyring serial 1")
    assert_one_sentence(error)
    assert harness.status_doc()["last_error"] == error
    assert commands == [*QUERIES, *LIST]
    assert charon.state() == state == expected(good)
    harness.publish(build_keyring(5, serial=2))
    harness.step()
    assert harness.agent.last_error is None
    assert charon.state() == expected(build_keyring(5))


def test_missing_keyring_file_is_reported(harness: Harness, charon: CharonProcess) -> None:
    """No keyring.json yet: one sentence naming the directory; nothing is sent to charon."""
    harness.keys.mkdir()
    assert harness.step() == []
    assert harness.agent.last_error is not None
    assert f"no keyring.json in {harness.keys}" in harness.agent.last_error
    assert charon.state() == (set(), set())


def test_oversize_keyring_error_states_the_true_size(harness: Harness) -> None:
    """BUG: read_keyring_bytes reads limit+1 bytes, so a 10 MB file is reported as 1048577 bytes."""
    harness.publish(build_keyring(2))
    harness.step()
    harness.publish(_bad("10 MB", build_keyring(2)))
    harness.step()
    assert "1048577 bytes" not in (harness.agent.last_error or "")


def test_first_keyring_error_does_not_say_serial_none(harness: Harness) -> None:
    """BUG: with no good keyring yet the error ends "keeping keyring serial None"."""
    harness.publish("{")
    harness.step()
    assert "serial None" not in (harness.agent.last_error or "")


@pytest.mark.parametrize("kind", ["deep nesting", "huge integer"])
def test_hostile_keyring_does_not_crash_the_agent(harness: Harness, kind: str) -> None:
    """BUG: loads() lets RecursionError / ValueError escape; step() then raises and kills run()."""
    harness.publish(build_keyring(3))
    harness.step()
    harness.publish("[" * 100_000 if kind == "deep nesting" else '{"serial": ' + "7" * 5000 + "}")
    harness.step()
    assert harness.agent.last_error is not None


# --- charon loses its state ------------------------------------------------------------------


def test_swanctl_load_all_wipe_is_restored(harness: Harness, charon: CharonProcess) -> None:
    """`swanctl --load-all` with an empty file unloads everything; the next step restores it."""
    keyring = build_keyring(4)
    harness.publish(keyring)
    harness.step()
    empty = charon.dir / "empty-swanctl.conf"
    empty.write_text("")
    subprocess.run(
        ["swanctl", "--load-all", "--noprompt", "--file", str(empty), "--uri", charon.uri],
        capture_output=True,
        check=True,
        timeout=20,
    )
    assert charon.state() == (set(), set())
    commands = harness.step()
    assert charon.state() == expected(keyring)
    assert commands.count("load-conn") == 3 and commands.count("load-shared") == 6
    assert harness.agent.last_error is None


def test_charon_restart_is_reported_then_restored(harness: Harness, charon: CharonProcess) -> None:
    """While charon is down last_error says so; after its restart everything is reloaded."""
    keyring = build_keyring(4)
    harness.publish(keyring)
    harness.step()
    charon.kill()
    wait = harness.agent.step()
    error = harness.agent.last_error
    assert error is not None and str(charon.socket) in error
    assert_one_sentence(error)
    assert harness.status_doc()["last_error"] == error
    assert harness.status_doc()["charon_connected"] is False
    assert wait <= 1.0, "the agent retries with a short backoff, not the resync interval"
    harness.agent.step()
    assert "cannot reach charon's VICI socket" in (harness.agent.last_error or "")
    charon.start()
    assert charon.state() == (set(), set())
    harness.agent.step()
    assert harness.agent.last_error is None
    assert charon.state() == expected(keyring)
    assert harness.status_doc()["charon_connected"] is True


def test_restart_between_steps_recovers_within_two_steps(
    harness: Harness, charon: CharonProcess
) -> None:
    """charon restarted unseen: the stale session fails one step, the next reloads all."""
    keyring = build_keyring(3)
    harness.publish(keyring)
    harness.step()
    charon.kill()
    charon.start()
    harness.agent.step()
    if harness.agent.last_error is not None:
        assert "dropped" in harness.agent.last_error
        harness.agent.step()
    assert harness.agent.last_error is None
    assert charon.state() == expected(keyring)


# --- the watcher path --------------------------------------------------------------------------


def test_run_reacts_to_a_republished_secret_without_waiting_for_resync(
    harness: Harness, charon: CharonProcess
) -> None:
    """Agent.run() wakes on kubelet's ..data swap: a new peer is loaded in seconds, not 60 s."""
    harness.publish(build_keyring(3))
    stop = threading.Event()
    thread = threading.Thread(target=harness.agent.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert _eventually(lambda: charon.state() == expected(build_keyring(3)), 5)
        published = time.monotonic()
        harness.publish(build_keyring(4, serial=2))
        assert _eventually(lambda: charon.state() == expected(build_keyring(4)), 5)
        assert time.monotonic() - published < 5
        harness.publish(build_keyring(2, serial=3))
        assert _eventually(lambda: charon.state() == expected(build_keyring(2)), 5)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert harness.agent.last_error is None


def _eventually(condition: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())


def test_run_reloads_a_restarted_charon_without_waiting_for_resync(
    harness: Harness, charon: CharonProcess
) -> None:
    """Agent.run() notices the VICI socket close (resync is 60 s here) and reloads the new
    charon within a few seconds of its start."""
    keyring = build_keyring(3)
    harness.publish(keyring)
    stop = threading.Event()
    thread = threading.Thread(target=harness.agent.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert _eventually(lambda: charon.state() == expected(keyring), 5)
        charon.kill()
        charon.start()
        restarted = time.monotonic()
        assert _eventually(lambda: charon.state() == expected(keyring), 5)
        assert time.monotonic() - restarted < 5
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()


def _highest_ip_agent(
    charon: CharonProcess, tmp_path: Path
) -> tuple[Agent, RecordingCharon, set[str]]:
    """An agent for the highest-IP node of four (it initiates to none of its peers by
    itself), recording its requests; and the connections to its lower-IP peers."""
    keyring = build_keyring(4)
    highest = keyring.peers[-1].name
    recording = RecordingCharon(charon.uri)
    keys = tmp_path / "keys"
    publish_secret(keys, {KEYRING_FILE: dumps(keyring)})
    agent = Agent(AgentConfig(highest, keys, Settings(), resync_seconds=60), recording)
    return agent, recording, {conn_name(p.name) for p in keyring.peers if p.name != highest}


def test_a_new_charon_gets_the_lower_ip_peers_initiated_after_a_grace(
    charon: CharonProcess, tmp_path: Path
) -> None:
    """Connections a charon did not hold are initiated from the higher-IP end too, after
    INITIATE_GRACE, when no IKE_SA came up: the lower-IP peers (which initiate at once)
    may still hold IKE_SAs with a charon that is gone, which only INITIAL_CONTACT replaces."""
    agent, recording, lower_peers = _highest_ip_agent(charon, tmp_path)
    try:
        wait = agent.step()
        assert wait <= INITIATE_GRACE
        assert not [m for c, m in recording.log if c == "initiate"]
        time.sleep(INITIATE_GRACE)
        agent.step()
        initiated = {m["ike"] for c, m in recording.log if c == "initiate" and m}
        assert initiated == lower_peers
        before = len(recording.log)
        agent.step()  # IKE_SAs now exist (connecting): nothing is initiated again
        assert "initiate" not in [c for c, _ in recording.log[before:]]
    finally:
        recording.close()


def test_a_charon_restarted_under_the_agent_gets_every_peer_initiated_at_once(
    charon: CharonProcess, tmp_path: Path
) -> None:
    """No grace after a restart the agent saw: the lower-IP peers' own initiations went
    unanswered while charon was down, and charon retransmits them only after 4 s."""
    agent, recording, lower_peers = _highest_ip_agent(charon, tmp_path)
    try:
        agent.step()
        charon.kill()
        charon.start()
        before = len(recording.log)
        wait = agent.step()
        initiated = {m["ike"] for c, m in recording.log[before:] if c == "initiate" and m}
        assert initiated == lower_peers
        assert wait > INITIATE_GRACE  # nothing left pending
    finally:
        recording.close()


def test_metrics_and_charons_event_stream(harness: Harness, charon: CharonProcess) -> None:
    """The agent's metrics hook and the VICI event subscription against a real charon: the
    subscription gets charon's log (level <= 1) on its own session, survives a charon
    restart, and the metrics follow the agent's steps (charon down: /healthz unhealthy)."""
    import dataclasses

    from prometheus_client import generate_latest

    from overlay_vici.agent.charon import EventWatcher
    from overlay_vici.agent.metrics import AgentMetrics

    seen: list[tuple[str, dict[str, Any]]] = []
    metrics = AgentMetrics(resync=60)

    def handle(name: str, message: dict[str, Any]) -> None:
        seen.append((name, message))
        metrics.on_event(name, message)

    metrics.events = EventWatcher(charon.uri, handle, poll=0.1)
    # As the agent runs it: log events not about authentication are dropped undecoded.
    filtered: list[tuple[str, dict[str, Any]]] = []
    quiet = EventWatcher(charon.uri, lambda *event: filtered.append(event), log_filter=(b"MAC",))
    stop = threading.Event()
    thread = metrics.events.start(stop)
    quiet_thread = quiet.start(stop)
    try:
        wait_until("the event subscriptions", lambda: metrics.events.connected and quiet.connected)
        harness.agent.config = dataclasses.replace(harness.agent.config, on_step=metrics.observe)
        harness.publish(build_keyring(3))
        harness.step()
        key = secret_id("node-1", 1)
        wait_until(
            "charon's log event for the loaded key",
            lambda: any(
                name == "log" and f"loaded IKE shared key with id '{key}'" in m.get("msg", "")
                for name, m in seen
            ),
        )
        assert filtered == []
        text = generate_latest(metrics.registry).decode()
        assert 'overlay_vici_peer_sa_up{peer="node-1"} 0.0' in text
        assert 'overlay_vici_generation{generation="1",role="sent"} 1.0' in text
        assert "overlay_vici_charon_connected 1.0" in text
        assert "overlay_vici_events_connected 1.0" in text
        assert metrics.health() == (True, "ok")
        charon.kill()
        harness.step()
        assert metrics.health() == (False, "charon is not connected")
        # The dropped session is not reused (no request fails on it); no step can connect.
        harness.step()
        text = generate_latest(metrics.registry).decode()
        assert 'command="get-conns"' not in text
        assert 'overlay_vici_vici_errors_total{command="connect"} 2.0' in text
        charon.start()
        wait_until("the subscription to come back", lambda: metrics.events.sessions >= 2
                   and metrics.events.connected)  # fmt: skip
        harness.step()
        assert metrics.health() == (True, "ok")
    finally:
        stop.set()
        thread.join(5)
        quiet_thread.join(5)
    assert not thread.is_alive() and not quiet_thread.is_alive()


def wait_until(what: str, probe: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_the_event_watcher_token_is_none_unsubscribed_and_new_per_subscription(
    charon: CharonProcess,
) -> None:
    """What upkeep.SaUpkeep relies on to skip its list, against a real charon: no token
    while unsubscribed (nothing vouched for), a new one per subscription (events may have
    been missed between). Events changing it need established IKE_SAs: the UML mesh
    (test_agent_mesh.py) shows that."""
    from overlay_vici.agent.charon import EventWatcher

    watcher = EventWatcher(charon.uri, poll=0.1)
    assert watcher.sa_token() is None
    stop = threading.Event()
    thread = watcher.start(stop)
    try:
        wait_until("subscribed", lambda: watcher.sa_token() is not None)
        first = watcher.sa_token()
        charon.kill()
        wait_until("the subscription to drop", lambda: watcher.sa_token() is None)
        charon.start()
        wait_until("subscribed again", lambda: watcher.sa_token() not in (None, first), 15)
    finally:
        stop.set()
        thread.join(timeout=10)
