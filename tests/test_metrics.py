"""Metrics and /healthz: the pure mappings (status -> values, decision -> values, charon's
events -> counts), the exposition, the HTTP edge, and both commands serving them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from keyring_fixtures import build_keyring
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from overlay_vici.agent.agent import StepReport
from overlay_vici.agent.metrics import (
    AgentCounts,
    AgentMetrics,
    ReauthTracker,
    agent_families,
    charon_event,
    peer_sa_up,
)
from overlay_vici.agent.render import conn_name
from overlay_vici.agent.sa_plan import IkeSa
from overlay_vici.core import metrics
from overlay_vici.core.contract import AGENT_METRICS_PORT, MASTER_METRICS_PORT
from overlay_vici.core.keyring import Generation, Keyring, Peer
from overlay_vici.master.local import LocalStore
from overlay_vici.master.master import Master
from overlay_vici.master.metrics import MasterMetrics, master_families
from overlay_vici.master.rotation import Decision, MasterState, Policy

EXE = Path(sys.executable).with_name("overlay-vici")

STATUS = {
    "node": "node-0",
    "updated": 1000.0,
    "keyring_serial": 3,
    "sent_generation": 1,
    "sent_since": 900.0,
    "generations": {"1": "sent", "2": "accepted"},
    "peers_expected": 3,
    "peers_without_key": 1,
    "peers_up": 2,
    "ike_sas": 4,
    "stale_ike_sas": 1,
    "stale_peers": ["ov-node-3"],
    "reauthenticated": False,
    "charon_connected": True,
    "vici_messages": 17,
    "last_error": None,
    "encryption": "on",
    "guard": {"backend": "legacy", "installed": True, "outside": []},
}


def exposition(families: list[metrics.Family]) -> dict[str, float]:
    """What Prometheus would scrape: 'name{a="b"}' -> value, parsed by prometheus_client."""
    registry = CollectorRegistry()
    registry.register(metrics.Collector(lambda: families))
    text = generate_latest(registry).decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def sa(unique_id: str, peer: str, state: str = "ESTABLISHED", children: int = 1) -> IkeSa:
    child_ids = tuple(f"c{i}" for i in range(children))
    return IkeSa(unique_id, conn_name(peer), state, 10, child_ids, True)


# --- the agent: pure ------------------------------------------------------------------------


def test_agent_status_maps_to_its_metrics() -> None:
    counts = AgentCounts(
        auth_failures=Counter({"mismatch": 2}),
        rekeys=Counter({"child": 5, "ike": 1}),
        vici_errors={"load-conn": 1, "connect": 3},
        reauth_requests=4,
        reauths_completed=3,
        events_connected=True,
    )
    peer_up = {"node-1": True, "node-2": True, "node-3": False}
    samples = exposition(agent_families(STATUS, peer_up, counts, 999.5))
    assert samples == {
        'overlay_vici_peer_sa_up{peer="node-1"}': 1,
        'overlay_vici_peer_sa_up{peer="node-2"}': 1,
        'overlay_vici_peer_sa_up{peer="node-3"}': 0,
        "overlay_vici_peers_expected": 3,
        "overlay_vici_peers_without_key": 1,
        "overlay_vici_peers_up": 2,
        "overlay_vici_ike_sas": 4,
        "overlay_vici_stale_ike_sas": 1,
        'overlay_vici_generation{generation="1",role="sent"}': 1,
        'overlay_vici_generation{generation="2",role="accepted"}': 1,
        "overlay_vici_keyring_serial": 3,
        'overlay_vici_encryption_mode{mode="on"}': 1,
        'overlay_vici_encryption_mode{mode="prepare"}': 0,
        'overlay_vici_encryption_mode{mode="off"}': 0,
        "overlay_vici_guard_installed": 1,
        "overlay_vici_charon_connected": 1,
        "overlay_vici_events_connected": 1,
        'overlay_vici_ike_auth_failures_total{reason="mismatch"}': 2,
        'overlay_vici_ike_auth_failures_total{reason="no_key"}': 0,
        'overlay_vici_ike_auth_failures_total{reason="rejected"}': 0,
        'overlay_vici_rekeys_total{sa="child"}': 5,
        'overlay_vici_rekeys_total{sa="ike"}': 1,
        "overlay_vici_reauth_requests_total": 4,
        "overlay_vici_reauths_completed_total": 3,
        'overlay_vici_vici_errors_total{command="connect"}': 3,
        'overlay_vici_vici_errors_total{command="load-conn"}': 1,
        "overlay_vici_last_success_timestamp_seconds": 999.5,
    }


def test_before_any_keyring_only_what_is_known_is_exported() -> None:
    """No keyring yet: no serial, no generation, no peers, no success time; charon down."""
    empty = {"generations": {}, "keyring_serial": None, "charon_connected": False}
    samples = exposition(agent_families(empty, {}, AgentCounts(), None))
    assert not any(name.startswith(("overlay_vici_peer_sa_up", "overlay_vici_generation"))
                   for name in samples)  # fmt: skip
    assert "overlay_vici_keyring_serial" not in samples
    assert "overlay_vici_last_success_timestamp_seconds" not in samples
    assert samples["overlay_vici_charon_connected"] == 0
    assert "overlay_vici_guard_installed" not in samples  # run with --no-guard


def test_a_retired_generation_disappears_from_the_metrics() -> None:
    """The values come from the current status each time: no stale label set lingers."""
    before = exposition(agent_families(STATUS, {}, AgentCounts(), None))
    after = exposition(
        agent_families({**STATUS, "generations": {"2": "sent"}}, {}, AgentCounts(), None)
    )
    assert 'overlay_vici_generation{generation="1",role="sent"}' in before
    assert [k for k in after if k.startswith("overlay_vici_generation")] == [
        'overlay_vici_generation{generation="2",role="sent"}'
    ]


def test_peer_sa_up_needs_an_established_ike_sa_with_an_installed_child() -> None:
    keyring = build_keyring(4)
    sas = [
        sa("1", "node-1"),
        sa("2", "node-2", children=0),
        sa("3", "node-3", state="CONNECTING", children=0),
    ]
    assert peer_sa_up(keyring, "node-0", sas) == {
        "node-1": True,
        "node-2": False,
        "node-3": False,
    }
    assert peer_sa_up(None, "node-0", sas) == {}


# Log lines as charon 5.9.8 formats them (the UML test checks them against real charons).
@pytest.mark.parametrize(
    ("name", "message", "counted"),
    [
        ("ike-rekey", {"ov-n2": {}}, ("rekeys", "ike")),
        ("child-rekey", {"ov-n2": {}}, ("rekeys", "child")),
        (
            "log",
            {"group": "IKE", "level": "1", "msg": "tried 1 shared key for '10.99.0.2' - "
             "'10.99.0.1', but MAC mismatched"},
            ("auth_failures", "mismatch"),
        ),
        (
            "log",
            {"group": "IKE", "level": "1", "msg": "tried 2 shared keys for '10.99.0.2' - "
             "'10.99.0.1', but MAC mismatched"},
            ("auth_failures", "mismatch"),
        ),
        (
            "log",
            {"group": "IKE", "msg": "no shared key found for '10.99.0.1' - '10.99.0.2'"},
            ("auth_failures", "no_key"),
        ),
        (
            "log",
            {"group": "IKE", "msg": "received AUTHENTICATION_FAILED notify error"},
            ("auth_failures", "rejected"),
        ),
        ("log", {"group": "IKE", "msg": "authentication of '10.99.0.2' with pre-shared key "
                 "successful"}, None),
        ("log", {"group": "IKE", "msg": "received NO_PROPOSAL_CHOSEN notify error"}, None),
        ("log", {"group": "IKE", "msg": "sending AUTHENTICATION_FAILED notify"}, None),
        ("ike-updown", {"ov-n2": {}}, None),
        ("log", {}, None),
    ],
)  # fmt: skip
def test_charon_events_counted(name: str, message: dict[str, Any], counted: Any) -> None:
    assert charon_event(name, message) == counted


def test_reauthentications_complete_when_a_fresh_sa_replaces_the_old() -> None:
    tracker = ReauthTracker()
    conns = {conn_name("n2"), conn_name("n3"), conn_name("n4")}
    # Step 1: the agent asks for #1 (n2) and #5 (n3); #9 is unknown (already gone).
    tracker.observe(["1", "5", "9"], [sa("1", "n2"), sa("5", "n3")], conns)
    assert (tracker.requested, tracker.completed) == (3, 0)
    # Step 2: n2 has its new SA and the old one is gone; n3's old one is gone, none up yet.
    tracker.observe([], [sa("2", "n2"), sa("6", "n3", state="CONNECTING", children=0)], conns)
    assert (tracker.requested, tracker.completed) == (3, 1)
    # Step 3: n3's new one is up.
    tracker.observe([], [sa("2", "n2"), sa("6", "n3")], conns)
    assert (tracker.requested, tracker.completed) == (3, 2)
    # A request on a connection that is then unloaded is forgotten, not completed.
    tracker.observe(["7"], [sa("7", "n4")], conns)
    tracker.observe([], [], conns - {conn_name("n4")})
    assert (tracker.requested, tracker.completed, tracker.pending) == (4, 2, {})


# --- the agent: the collector, fed by a (stand-in) agent -------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def step_report(status: dict[str, Any], sas: list[IkeSa], requested: list[str]) -> StepReport:
    keyring = Keyring(
        3, 1, (Generation(1, b"\x01" * 32),), (Peer("n1", "10.0.0.1"), Peer("n2", "10.0.0.2"))
    )
    return StepReport(
        status={"node": "n1", **status},  # type: ignore[typeddict-item]
        keyring=keyring,
        sas=tuple(sas),
        conns=frozenset({conn_name("n2")}),
        reauth_requested=tuple(requested),
        vici_errors=Counter({"list-sas": 1}),
    )


def test_agent_metrics_observe_and_health() -> None:
    clock = Clock()
    m = AgentMetrics(resync=30, clock=clock)
    assert m.health() == (False, "no step finished yet")
    status = {**STATUS, "generations": {"1": "sent"}}
    m.observe(step_report(status, [sa("4", "n2")], ["4"]), 0.02)
    assert m.health() == (True, "ok")
    m.on_event("child-rekey", {})
    m.on_event("log", {"msg": "received AUTHENTICATION_FAILED notify error"})
    samples = exposition(m.families())
    assert samples['overlay_vici_peer_sa_up{peer="n2"}'] == 1
    assert samples["overlay_vici_reauth_requests_total"] == 1
    assert samples['overlay_vici_rekeys_total{sa="child"}'] == 1
    assert samples['overlay_vici_ike_auth_failures_total{reason="rejected"}'] == 1
    assert samples['overlay_vici_vici_errors_total{command="list-sas"}'] == 1
    assert samples["overlay_vici_last_success_timestamp_seconds"] == 1000.0
    text = generate_latest(m.registry).decode()
    assert "overlay_vici_reconcile_duration_seconds_count 1.0" in text
    assert "process_cpu_seconds_total" in text
    # Charon goes away: the next step says so, /healthz turns 503.
    clock.t += 1
    m.observe(step_report({**status, "charon_connected": False, "last_error": "x"}, [], []), 0.01)
    assert m.health() == (False, "charon is not connected")
    assert exposition(m.families())["overlay_vici_last_success_timestamp_seconds"] == 1000.0
    # Steps stop: after three resync intervals, 503.
    m.observe(step_report(status, [sa("5", "n2")], []), 0.01)
    assert m.health() == (True, "ok")
    clock.t += 91
    assert m.health() == (False, "the last step finished 91s ago")
    # The reauthentication of #4 completed: #4 gone, #5 up.
    assert exposition(m.families())["overlay_vici_reauths_completed_total"] == 1


def test_a_broken_observation_is_logged_and_never_raises(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from overlay_vici.core import log

    log.setup("info")
    m = AgentMetrics(resync=30)
    m.observe(SimpleNamespace(status={}), 0.1)  # type: ignore[arg-type]
    line = json.loads(capsys.readouterr().err.splitlines()[-1])
    assert line["event"] == "metrics update failed" and "AttributeError" in line["error"]


# --- the master: pure ----------------------------------------------------------------------


def decision(state: MasterState, **kwargs: Any) -> Decision:
    keyring = Keyring(
        7,
        2,
        (Generation(1, b"\x01" * 32), Generation(2, b"\x02" * 32)),
        tuple(Peer(f"n{i}", f"10.0.0.{i}") for i in range(1, 6)),
    )
    fields = {"waiting": (), "expired": (), "absent": (), **kwargs}
    return Decision(keyring, state, False, fields["waiting"], fields["expired"], fields["absent"])


def test_master_decision_maps_to_its_metrics() -> None:
    history = (
        {"rotation": 1, "stage": 100.0, "switch": 110.0, "retire": 160.0, "idle": 175.0},
        {"rotation": 2, "stage": 1000.0, "switch": 1012.5},
    )
    state = MasterState(
        phase="switch", rotation=2, phase_serial=7, last_rotation=175.0, history=history
    )
    d = decision(state, waiting=("n2",), expired=("n4",), absent=("n5",))
    samples = exposition(master_families(True, d, {"secret": 2}))
    assert samples == {
        "overlay_vici_leader": 1,
        'overlay_vici_api_conflicts_total{resource="secret"}': 2,
        'overlay_vici_api_conflicts_total{resource="lease"}': 0,
        "overlay_vici_active_generation": 2,
        "overlay_vici_keyring_serial": 7,
        'overlay_vici_rotation_phase{phase="idle"}': 0,
        'overlay_vici_rotation_phase{phase="stage"}': 0,
        'overlay_vici_rotation_phase{phase="switch"}': 1,
        'overlay_vici_rotation_phase{phase="retire"}': 0,
        "overlay_vici_rotations_completed_total": 1,
        "overlay_vici_rotation_phase_started_timestamp_seconds": 1012.5,
        'overlay_vici_rotation_phase_duration_seconds{phase="stage"}': 10,
        'overlay_vici_rotation_phase_duration_seconds{phase="switch"}': 50,
        'overlay_vici_rotation_phase_duration_seconds{phase="retire"}': 15,
        "overlay_vici_last_rotation_timestamp_seconds": 175.0,
        'overlay_vici_agents{state="live"}': 3,
        'overlay_vici_agents{state="expired"}': 1,
        'overlay_vici_agents{state="absent"}': 1,
        "overlay_vici_agents_waiting": 1,
    }
    idle = MasterState(phase="idle", rotation=2, last_rotation=2000.0, history=history)
    samples = exposition(master_families(True, decision(idle), {}))
    assert samples["overlay_vici_rotations_completed_total"] == 2
    assert samples['overlay_vici_rotation_phase{phase="idle"}'] == 1
    assert "overlay_vici_rotation_phase_started_timestamp_seconds" not in samples


def test_a_standby_master_exports_only_that_it_stands_by() -> None:
    """A replica that does not lead has no current view of the mesh: no stale values."""
    state = MasterState(phase="stage", rotation=1)
    samples = exposition(master_families(False, decision(state), {"lease": 1}))
    assert samples == {
        "overlay_vici_leader": 0,
        'overlay_vici_api_conflicts_total{resource="secret"}': 0,
        'overlay_vici_api_conflicts_total{resource="lease"}': 1,
    }


def test_master_metrics_follow_a_local_master(tmp_path: Path) -> None:
    nodes = tmp_path / "nodes.json"
    nodes.write_text(
        json.dumps([{"name": "n1", "ip": "10.0.0.1"}, {"name": "n2", "ip": "10.0.0.2"}])
    )
    clock = Clock()
    m = MasterMetrics(tick=2, clock=clock)
    stop = threading.Event()

    def once(master: Master, seconds: float) -> None:
        m.observe(master, seconds)
        stop.set()

    Master(LocalStore(tmp_path / "state", nodes), Policy(), tick=0.01, on_step=once).run(stop)
    samples = exposition(m.families())
    assert samples["overlay_vici_leader"] == 1
    assert samples["overlay_vici_active_generation"] == 1
    assert samples['overlay_vici_agents{state="absent"}'] == 2
    assert samples['overlay_vici_rotation_phase{phase="idle"}'] == 1
    assert (
        "overlay_vici_master_step_duration_seconds_count 1.0"
        in generate_latest(m.registry).decode()
    )
    assert m.health() == (True, "ok")
    clock.t += 31
    assert m.health() == (False, "the master's loop last passed 31s ago")


# --- HTTP ----------------------------------------------------------------------------------


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_the_endpoint_serves_metrics_and_healthz() -> None:
    registry = CollectorRegistry()
    registry.register(metrics.Collector(lambda: agent_families(STATUS, {}, AgentCounts(), 1.0)))
    health = [(True, "ok")]
    server = metrics.serve(0, registry, lambda: health[0], "127.0.0.1")
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        code, kind, body = get(base + "/metrics")
        assert code == 200 and kind.startswith("text/plain; version=0.0.4")
        assert "overlay_vici_ike_sas 4.0" in body
        assert get(base + "/healthz") == (200, "text/plain; charset=utf-8", "ok\n")
        health[0] = (False, "charon is not connected")
        assert get(base + "/healthz")[::2] == (503, "charon is not connected\n")
        assert get(base + "/")[0] == 404
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int, timeout: float = 20) -> tuple[dict[str, float], tuple[int, str]]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            code, _, text = get(f"http://127.0.0.1:{port}/metrics")
            health = get(f"http://127.0.0.1:{port}/healthz")
            break
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    assert code == 200
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples, (health[0], health[2])


def stop_process(process: subprocess.Popen[bytes]) -> str:
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=15)
    return err.decode()


def test_the_local_master_serves_its_metrics(tmp_path: Path) -> None:
    nodes = tmp_path / "nodes.json"
    nodes.write_text(json.dumps([{"name": "n1", "ip": "10.0.0.1"}]))
    port = free_port()
    process = subprocess.Popen(
        [str(EXE), "master", "--local", str(tmp_path / "s"), "--nodes", str(nodes),
         "--tick", "0.2", "--metrics-port", str(port)],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            samples, health = scrape(port)
            if samples.get("overlay_vici_active_generation") == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        err = stop_process(process)
    assert health == (200, "ok\n"), err
    assert samples["overlay_vici_leader"] == 1 and samples["overlay_vici_active_generation"] == 1
    assert samples['overlay_vici_agents{state="absent"}'] == 1
    events = [json.loads(line)["event"] for line in err.splitlines()]
    assert events[:2] == ["master starting", "metrics endpoint serving"]


def test_an_agent_without_charon_is_unhealthy_and_counts_the_failures(tmp_path: Path) -> None:
    """The agent's endpoint with no charon behind the socket: /healthz 503, the failed
    connects counted, the event subscription down; no tunl0 here, so no MTU warning."""
    keys = tmp_path / "keys"
    from overlay_vici.core.contract import KEYRING_FILE
    from overlay_vici.core.files import publish_secret
    from overlay_vici.core.keyring import dumps

    publish_secret(keys, {KEYRING_FILE: dumps(build_keyring(3))})
    port = free_port()
    process = subprocess.Popen(
        [str(EXE), "agent", "--node", "node-0", "--keys", str(keys),
         "--vici", f"unix://{tmp_path}/nothing.vici", "--no-guard",
         "--metrics-port", str(port), "--node-key", str(tmp_path / "node.key")],
        stderr=subprocess.PIPE,
        env={**os.environ, "PATH": os.environ.get("PATH", "")},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            samples, health = scrape(port)
            if samples.get('overlay_vici_vici_errors_total{command="connect"}', 0) >= 2:
                break
            assert time.monotonic() < deadline, samples
            time.sleep(0.2)
    finally:
        err = stop_process(process)
    assert health == (503, "charon is not connected\n")
    assert samples["overlay_vici_charon_connected"] == 0
    assert samples["overlay_vici_events_connected"] == 0
    assert "overlay_vici_keyring_serial" not in samples  # accepted, but never applied
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(e["event"] == "metrics endpoint serving" and e["port"] == port for e in events)
    assert not any(e["event"] == "MTU too large" for e in events)


def test_metrics_port_defaults_and_zero_disables() -> None:
    from overlay_vici.cli import build_parser
    from overlay_vici.master.cli import _master_metrics

    parser = build_parser()
    agent = parser.parse_args(["agent", "--node", "n", "--keys", "k", "--vici", "unix:///x"])
    assert agent.metrics_port == AGENT_METRICS_PORT == 9541
    assert parser.parse_args(["master"]).metrics_port == MASTER_METRICS_PORT == 9540
    assert _master_metrics(parser.parse_args(["master", "--metrics-port", "0"])) is None
