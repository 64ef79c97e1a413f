"""The master in Kubernetes mode, through the real `kubernetes` client over HTTP to the fake
API server (tests/kubefake.py); the agents acknowledge with the stdlib Lease edge.

The clock is the tests' own: agents' heartbeats, leader Leases and rotation intervals all
read it, so that expiry and failover are exact and fast.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("kubernetes")

from kubefake import FakeKube

from overlay_vici.cli import main
from overlay_vici.core import keyring as kr
from overlay_vici.core.contract import lease_name
from overlay_vici.core.files import write_json
from overlay_vici.master.kube import REQUEST_ANNOTATION, KubeStore, api_client
from overlay_vici.master.master import Master
from overlay_vici.master.nodes import NodeWatcher
from overlay_vici.master.rotation import Policy
from overlay_vici.reporter.lease import ApiServer, LeaseReporter, run_reporter

NS = "ovv"
SECRET = "overlay-vici-keys"
POLICY = Policy(interval=3600, agent_timeout=30)


class Clock:
    """Starts 40 s in the past, so that `overlay-vici status` (wall clock) sees the same ages
    as the master would 40 s after the test's "now"."""

    def __init__(self) -> None:
        self.t = time.time() - 40

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    with FakeKube() as fake:
        for i in (1, 2, 3):
            fake.node(f"n{i}", f"10.0.0.{i}")
        yield fake


class Harness:
    """Masters (replicas) and agents against one fake API server."""

    def __init__(self, kube: FakeKube) -> None:
        self.kube = kube
        self.clock = Clock()
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.api = ApiServer(kube.url)

    def master(self, identity: str = "a") -> Master:
        api = api_client(server=self.kube.url)
        watcher = NodeWatcher(api, timeout=1)
        thread = threading.Thread(target=watcher.run, args=(self.stop,), daemon=True)
        thread.start()
        self.threads.append(thread)
        until("the first node list", lambda: watcher.nodes is not None)
        store = KubeStore(api, NS, SECRET, identity=identity, lease_duration=10, watcher=watcher)
        return Master(store, POLICY, clock=self.clock)

    def ack(self, *names: str, serial: int | None = None, **fields: Any) -> None:
        """Agents report through their Leases, as `overlay-vici report-lease` does."""
        keyring = self.keyring()
        for name in names:
            status = {
                "node": name,
                "updated": self.clock.t,
                "keyring_serial": keyring.serial if serial is None else serial,
                "sent_generation": keyring.sent,
                "generations": {
                    str(g.id): "sent" if g.id == keyring.sent else "accepted"
                    for g in keyring.generations
                },
                "reauthenticated": True,
                "stale_ike_sas": 0,
                "stale_peers": [],
                "peers_up": len(keyring.peers) - 1,
                "peers_expected": len(keyring.peers) - 1,
                "last_error": None,
                **fields,
            }
            LeaseReporter(self.api, NS, name).report(status)

    def secret(self) -> dict[str, Any]:
        secret = self.kube.get("secrets", SECRET, NS)
        assert secret is not None
        return secret

    def keyring(self) -> kr.Keyring:
        return kr.loads(base64.b64decode(self.secret()["data"]["keyring.json"]))

    def state(self) -> dict[str, Any]:
        return json.loads(base64.b64decode(self.secret()["data"]["master.json"]))

    def request(self) -> None:
        assert main(["rotate", "--server", self.kube.url, "--namespace", NS]) == 0

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(5)


@pytest.fixture
def harness(kube: FakeKube) -> Iterator[Harness]:
    h = Harness(kube)
    yield h
    h.close()


def until(what: str, probe: Callable[[], Any], timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return value


def peers(h: Harness) -> dict[str, str]:
    return {p.name: p.ip for p in h.keyring().peers}


def test_node_join_leave_ip_change_and_opt_out_follow_the_watch(harness: Harness) -> None:
    h, kube = harness, harness.kube
    master = h.master()
    master.step()
    assert peers(h) == {"n1": "10.0.0.1", "n2": "10.0.0.2", "n3": "10.0.0.3"}
    assert h.keyring().serial == 1
    changes: list[tuple[Callable[[], None], dict[str, str]]] = [
        (
            lambda: kube.node("n4", "10.0.0.4"),
            {"n1": "10.0.0.1", "n2": "10.0.0.2", "n3": "10.0.0.3", "n4": "10.0.0.4"},
        ),
        (
            lambda: kube.delete("nodes", "n2"),
            {"n1": "10.0.0.1", "n3": "10.0.0.3", "n4": "10.0.0.4"},
        ),
        (
            lambda: kube.node("n1", "10.0.0.11"),
            {"n1": "10.0.0.11", "n3": "10.0.0.3", "n4": "10.0.0.4"},
        ),
        (
            lambda: kube.node("n3", "10.0.0.3", {"overlay-vici.io/opt-out": "true"}),
            {"n1": "10.0.0.11", "n4": "10.0.0.4"},
        ),
        (
            lambda: kube.node("n3", "10.0.0.3", {"overlay-vici.io/opt-out": "false"}),
            {"n1": "10.0.0.11", "n3": "10.0.0.3", "n4": "10.0.0.4"},
        ),
    ]
    for serial, (change, expected) in enumerate(changes, start=2):
        change()
        until(f"peers {expected}", lambda e=expected: master.step() and peers(h) == e)
        assert h.keyring().serial == serial
        # Opted out, n3 is outside the mesh: the one node IPIP may reach unencrypted.
        outside = [] if "n3" in expected else [kr.Peer("n3", "10.0.0.3")]
        assert list(h.keyring().outside) == outside
    generation = h.keyring().generations
    assert generation == kr.loads(kr.dumps(h.keyring())).generations  # keys untouched


def test_a_too_old_watch_relists_after_410_gone(harness: Harness) -> None:
    h, kube = harness, harness.kube
    master = h.master()
    master.step()
    watcher = master.store.watcher  # type: ignore[attr-defined]
    kube.compact()
    kube.node("n5", "10.0.0.5")
    # The running watch still sees n5; then the next watch from an old version gets 410.
    until("n5 in the peers", lambda: master.step() and "n5" in peers(h))
    kube.compact()
    time.sleep(1.2)  # the watch ends (timeoutSeconds=1) and resumes from a compacted version
    kube.node("n6", "10.0.0.6")
    until("n6 in the peers", lambda: master.step() and "n6" in peers(h))
    assert watcher.relists >= 2


def test_each_phase_waits_for_every_live_agent(harness: Harness) -> None:
    h = harness
    master = h.master()
    master.step()
    h.ack("n1", "n2", "n3")
    h.request()
    master.step()
    assert h.state()["phase"] == "stage" and h.keyring().serial == 2
    for phase, nxt in (("stage", "switch"), ("switch", "retire"), ("retire", "idle")):
        serial = h.keyring().serial
        h.clock.t += 1
        h.ack("n1", "n2")
        h.ack("n3", serial=serial - 1)  # live, still on the previous keyring
        master.step()
        assert h.state()["phase"] == phase, f"{phase} went on without n3"
        assert master.last is not None and master.last.waiting == ("n3",)
        if phase == "switch":  # applied, but not yet reauthenticated
            h.ack("n3", reauthenticated=False, stale_ike_sas=2, stale_peers=["ov-n1"])
            master.step()
            assert h.state()["phase"] == "switch"
        h.ack("n3")
        master.step()
        assert h.state()["phase"] == nxt
    assert [g.id for g in h.keyring().generations] == [2] and h.keyring().sent == 2


def test_an_expired_agent_is_reported_and_skipped(harness: Harness) -> None:
    h = harness
    master = h.master()
    master.step()
    h.ack("n1", "n2", "n3")
    h.request()
    master.step()
    h.clock.t += 31  # n3 reports no more: its Lease's heartbeat is 31 s old
    h.ack("n1", "n2")
    master.step()
    assert h.state()["phase"] == "switch"
    assert h.state()["expired"] == ["n3"]
    # Stale IKE_SAs towards the expired n3 only do not hold the live ones back.
    h.ack("n1", "n2", reauthenticated=False, stale_ike_sas=1, stale_peers=["ov-n3"])
    master.step()
    assert h.state()["phase"] == "retire"
    view = status_json(h)
    assert view["expired"] == ["n3"] and view["rotating"] is True
    assert {n["node"]: n["agent"] for n in view["nodes"]}["n3"] == "expired"


def status_json(h: Harness) -> dict[str, Any]:
    """`overlay-vici status --json` against the harness's API server."""
    return status_view(h.kube, "--agent-timeout", "30")


def status_view(kube: FakeKube, *options: str) -> dict[str, Any]:
    """`overlay-vici status --json` against the API, by the wall clock."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["status", "--server", kube.url, "--namespace", NS, "--json", *options]) == 0
    return json.loads(out.getvalue())


def test_a_conflicting_writer_is_never_overwritten(harness: Harness) -> None:
    """Between the master's read and its write, another writer (say a replica that still
    believed it led) publishes a stage with its own new key: the master's write gets 409,
    it reads again and goes on from that state, keeping the other writer's key."""
    h, kube = harness, harness.kube
    master = h.master()
    master.step()
    h.ack("n1", "n2", "n3")
    theirs = kr.Generation(2, b"\x07" * 32)

    def other_writer(method: str, resource: str, name: str) -> None:
        if resource != "secrets" or method != "PUT":
            return
        kube.before_write = None
        secret = kube.get("secrets", SECRET, NS)
        assert secret is not None
        keyring = kr.loads(base64.b64decode(secret["data"]["keyring.json"]))
        staged = kr.Keyring(7, keyring.sent, (*keyring.generations, theirs), keyring.peers)
        state = json.loads(base64.b64decode(secret["data"]["master.json"]))
        state.update(phase="stage", rotation=1, phase_serial=7)
        secret["data"]["keyring.json"] = base64.b64encode(kr.dumps(staged).encode()).decode()
        secret["data"]["master.json"] = base64.b64encode(json.dumps(state).encode()).decode()
        secret["metadata"].setdefault("annotations", {})["other"] = "writer"
        kube.apply("secrets", secret, NS)

    h.request()
    kube.before_write = other_writer
    master.step()
    puts = [code for method, res, _, code in kube.writes if res == "secrets" and method == "PUT"]
    # The request's PUT, then the master's, refused; on the re-read the other writer's stage
    # is what it finds, and with no agent on it yet there is nothing to write.
    assert puts[-2:] == [200, 409]
    keyring = h.keyring()
    assert keyring.generation(2) == theirs and keyring.serial == 7
    assert h.secret()["metadata"]["annotations"]["other"] == "writer"
    assert h.state()["phase"] == "stage"
    # Their stage is the rotation: once everyone has applied it, the master switches to it.
    h.ack("n1", "n2", "n3")
    master.step()
    assert h.keyring().sent == 2 and h.keyring().generation(2) == theirs
    assert h.keyring().serial == 8


def test_leader_failover_does_not_disturb_a_rotation(harness: Harness) -> None:
    h = harness
    a, b = h.master("a"), h.master("b")
    assert a.step() is not None and b.step() is None  # a leads, b stands by
    h.ack("n1", "n2", "n3")
    h.request()
    a.step()
    h.ack("n1", "n2", "n3")
    a.step()
    assert h.state()["phase"] == "switch"
    generations = h.keyring().generations
    # a dies. Until its Lease expires b stands by; then it takes over and goes on.
    h.clock.t += 5
    h.ack("n1", "n2", "n3")
    assert b.step() is None
    h.clock.t += 6
    assert b.step() is not None
    assert h.state()["phase"] == "retire"
    assert h.keyring().generations == tuple(g for g in generations if g.id == 2)
    lease = h.kube.get("leases", "overlay-vici-master", NS)
    assert lease is not None
    assert lease["spec"]["holderIdentity"] == "b" and lease["spec"]["leaseTransitions"] == 1
    # a comes back: b holds a live Lease, so a stands by and writes nothing.
    writes = len(h.kube.writes)
    assert a.step() is None
    assert [w for w in h.kube.writes[writes:] if w[1] == "secrets"] == []
    h.ack("n1", "n2", "n3")
    b.step()
    assert h.state()["phase"] == "idle" and h.state()["rotation"] == 1


@pytest.mark.parametrize("phase", ["stage", "switch", "retire"])
def test_a_master_restarted_mid_rotation_resumes_from_the_secret(
    harness: Harness, phase: str
) -> None:
    h = harness
    first = h.master("a")
    first.step()
    h.ack("n1", "n2", "n3")
    h.request()
    first.step()
    while h.state()["phase"] != phase:
        h.ack("n1", "n2", "n3")
        first.step()
    before = h.keyring()
    # A new process, same identity (the pod restarted): nothing in memory carries over.
    second = h.master("a")
    second.step()
    assert h.state()["phase"] == phase and h.keyring() == before  # nothing acked yet
    while h.state()["phase"] != "idle":
        h.ack("n1", "n2", "n3")
        second.step()
    final = h.keyring()
    assert [g.id for g in final.generations] == [2]
    assert final.generation(2) == before.generation(2)  # the staged key, not a new one
    assert h.state()["rotation"] == 1


def test_status_and_rotate_commands_through_the_api(harness: Harness) -> None:
    h = harness
    master = h.master()
    master.step()
    h.ack("n1", "n2")
    h.request()
    assert h.secret()["metadata"]["annotations"][REQUEST_ANNOTATION]
    master.step()
    view = status_json(h)
    assert view["active_generation"] == 1 and view["rotating"] is True
    assert view["phase"] == "stage" and view["generations"] == {"1": "sent", "2": "accepted"}
    assert [n["node"] for n in view["nodes"]] == ["n1", "n2", "n3"]
    assert {n["node"]: n["agent"] for n in view["nodes"]}["n3"] == "absent"


def test_a_missing_secret_is_created_and_a_broken_one_left_alone(harness: Harness) -> None:
    h, kube = harness, harness.kube
    master = h.master()
    master.step()
    assert h.keyring().serial == 1
    broken = h.secret()
    broken["data"]["keyring.json"] = base64.b64encode(b"{not json").decode()
    kube.apply("secrets", broken, NS)
    writes = len(kube.writes)
    master.step()
    assert kube.writes[writes:] == [("PUT", "leases", "overlay-vici-master", 200)]
    assert h.secret()["data"]["keyring.json"] == broken["data"]["keyring.json"]


def test_report_lease_copies_the_agents_report_and_stops_when_it_does(
    harness: Harness, tmp_path: Path
) -> None:
    h, kube = harness, harness.kube
    status_file = tmp_path / "status.json"
    write_json(
        status_file,
        {
            "node": "n1",
            "updated": 100.0,
            "keyring_serial": 3,
            "sent_generation": 1,
            "reauthenticated": True,
        },
    )
    reporter = LeaseReporter(h.api, NS, "n1", duration=90)
    stop = threading.Event()
    thread = threading.Thread(
        target=run_reporter, args=(reporter, status_file, stop), kwargs={"poll": 0.05}
    )
    thread.start()
    try:
        lease = until("n1's Lease", lambda: kube.get("leases", lease_name("n1"), NS))
        assert lease["spec"]["holderIdentity"] == "n1"
        assert lease["spec"]["renewTime"].startswith("1970-01-01T00:01:40")
        report = json.loads(lease["metadata"]["annotations"]["overlay-vici.io/status"])
        assert report["keyring_serial"] == 3
        write_json(
            status_file,
            {
                "node": "n1",
                "updated": 101.0,
                "keyring_serial": 4,
                "sent_generation": 1,
                "reauthenticated": True,
            },
        )
        until(
            "the new serial",
            lambda: (
                '"keyring_serial": 4'
                in kube.get("leases", lease_name("n1"), NS)["metadata"]["annotations"][
                    "overlay-vici.io/status"
                ]
            ),
        )
        # The agent stops writing its report: the Lease is not renewed on its behalf.
        version = kube.get("leases", lease_name("n1"), NS)["metadata"]["resourceVersion"]
        time.sleep(0.3)
        assert kube.get("leases", lease_name("n1"), NS)["metadata"]["resourceVersion"] == version
    finally:
        stop.set()
        thread.join(5)


def test_only_labelled_leases_count_as_reports_and_api_errors_are_one_sentence(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    h, kube = harness, harness.kube
    master = h.master()
    master.step()
    h.ack("n1")
    stray = kube.get("leases", lease_name("n1"), NS)
    assert stray is not None
    stray["metadata"]["name"] = "not-an-ack"
    stray["metadata"]["labels"] = {}
    kube.apply("leases", stray, NS)
    assert set(master.store.reports()) == {"n1"}  # the labelSelector leaves the stray out
    kube.delete("secrets", SECRET, NS)
    assert main(["status", "--server", h.kube.url, "--namespace", NS]) == 2
    assert capsys.readouterr().err == (
        f"overlay-vici: no Secret {NS}/{SECRET}; is the master running?\n"
    )
    assert main(["rotate", "--server", "http://127.0.0.1:9", "--namespace", NS]) == 2
    err = capsys.readouterr().err
    assert err.startswith("overlay-vici: cannot reach the Kubernetes API") and err.count("\n") == 1


# --- Kubernetes Events and the metrics' conflict count --------------------------------------


def events(kube: FakeKube) -> list[dict[str, Any]]:
    """The Events the fake API server stored, oldest first."""
    with kube.cond:
        stored = [o for (r, _, _), o in kube.objects.items() if r == "events"]
    return sorted(stored, key=lambda e: int(e["metadata"]["resourceVersion"]))


def recording_master(h: Harness) -> Master:
    master = h.master()
    master.notify = master.store.record  # type: ignore[attr-defined]
    return master


def test_a_rotation_records_events_on_the_secret(harness: Harness) -> None:
    """Through the real client: phase by phase, a Normal Event on the Secret, carrying its
    uid (kubectl describe finds an object's Events by uid); the fake validates each."""
    h = harness
    master = recording_master(h)
    master.step()
    h.ack("n1", "n2", "n3")
    h.request()
    master.step()
    while h.state()["phase"] != "idle":
        h.ack("n1", "n2", "n3")
        master.step()
    recorded = events(h.kube)
    assert [e["reason"] for e in recorded] == [
        "RotationStarted",
        "RotationPhaseSwitch",
        "RotationPhaseRetire",
        "RotationDone",
    ]
    secret = h.secret()
    for event in recorded:
        assert event["type"] == "Normal"
        assert event["involvedObject"] == {
            "apiVersion": "v1",
            "kind": "Secret",
            "namespace": NS,
            "name": SECRET,
            "uid": secret["metadata"]["uid"],
        }
        assert event["metadata"]["namespace"] == NS
        assert event["metadata"]["name"].startswith(f"{SECRET}.")
        assert event["source"] == {"component": "overlay-vici-master"}
        assert event["reportingInstance"] == "a" and event["count"] == 1
        assert event["firstTimestamp"] == event["lastTimestamp"]
        assert event["message"].endswith(".") and "\n" not in event["message"]
    assert recorded[0]["message"] == (
        "Rotation 1 started (requested): phase stage began, generation 2 is accepted but not "
        "yet sent."
    )
    assert recorded[-1]["message"] == (
        "Rotation 1 done: phase retire finished; generation 2 is the only key."
    )
    posts = [(m, code) for m, res, _, code in h.kube.writes if res == "events"]
    assert posts == [("POST", 201)] * 4


def test_an_expired_agent_and_a_broken_keyring_record_warnings(harness: Harness) -> None:
    h, kube = harness, harness.kube
    master = recording_master(h)
    master.step()
    h.ack("n1", "n2", "n3")
    master.step()
    h.clock.t += 31
    h.ack("n1", "n2")
    master.step()
    expired = [e for e in events(kube) if e["reason"] == "AgentExpired"]
    assert len(expired) == 1 and expired[0]["type"] == "Warning"
    lease = kube.get("leases", lease_name("n3"), NS)
    assert lease is not None
    assert expired[0]["involvedObject"] == {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "namespace": NS,
        "name": lease_name("n3"),
        "uid": lease["metadata"]["uid"],
    }
    assert "node n3" in expired[0]["message"]
    h.ack("n1", "n2", "n3")
    master.step()
    assert [e["reason"] for e in events(kube)][-1] == "AgentNotExpired"

    broken = h.secret()
    broken["data"]["keyring.json"] = base64.b64encode(b"{not json").decode()
    kube.apply("secrets", broken, NS)
    master.step()
    master.step()  # the same defect again: one Event, as one log line
    unparseable = [e for e in events(kube) if e["reason"] == "KeyringUnparseable"]
    assert len(unparseable) == 1 and unparseable[0]["type"] == "Warning"
    assert unparseable[0]["involvedObject"]["kind"] == "Secret"
    assert unparseable[0]["message"].startswith("The Secret's keyring cannot be parsed (")
    assert unparseable[0]["message"].endswith("fix or delete the Secret.")
    assert h.secret()["data"]["keyring.json"] == broken["data"]["keyring.json"]


def test_the_fake_api_server_validates_events_as_kube_apiserver_does(kube: FakeKube) -> None:
    """The control for the tests above: what the real API server refuses, the fake refuses
    (an involved object in another namespace, a new-style Event without its required
    fields, a body in another namespace than the URL, no name)."""
    from kubernetes.client import ApiException, CoreV1Api

    core = CoreV1Api(api_client(server=kube.url))

    def post(body: dict[str, Any]) -> int:
        try:
            core.create_namespaced_event(NS, body)
        except ApiException as exc:
            return exc.status
        return 201

    good = {
        "metadata": {"name": "x.1"},
        "involvedObject": {"kind": "Secret", "namespace": NS, "name": SECRET},
        "reason": "R",
        "message": "m",
        "type": "Normal",
    }
    elsewhere = {"kind": "Secret", "namespace": "other", "name": "s"}
    node = {"kind": "Node", "name": "n1"}  # cluster-scoped: only for Events in "default"
    assert post(good) == 201
    assert post({**good, "metadata": {"name": "x.2"}, "involvedObject": elsewhere}) == 422
    assert post({**good, "metadata": {"name": "x.3"}, "involvedObject": node}) == 422
    new_style = {**good, "metadata": {"name": "x.4"}, "eventTime": "2024-01-01T00:00:00.000000Z"}
    assert post(new_style) == 422  # no reportingController, reportingInstance, action
    new_style.update(reportingComponent="overlay-vici.io/master", reportingInstance="a",
                     action="Rotate")  # fmt: skip
    assert post(new_style) == 201
    assert post({**good, "metadata": {"name": "x.5", "namespace": "other"}}) == 400
    assert post({**good, "metadata": {}}) == 422
    assert post({**good, "metadata": {"generateName": "x."}}) == 201
    assert post(good) == 409  # AlreadyExists


def test_a_failing_event_is_logged_once_and_the_rotation_goes_on(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    from overlay_vici.core import log

    log.setup("info")
    h, kube = harness, harness.kube
    master = recording_master(h)
    master.step()

    def refuse(method: str, resource: str, name: str) -> None:
        if resource == "events":
            raise ConnectionResetError("the API server hung up")

    kube.before_write = refuse
    h.ack("n1", "n2", "n3")
    h.request()
    master.step()
    while h.state()["phase"] != "idle":
        h.ack("n1", "n2", "n3")
        master.step()
    assert events(kube) == [] and h.state()["rotation"] == 1
    err = capsys.readouterr().err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    failures = [line for line in lines if line["event"] == "cannot record a Kubernetes Event"]
    assert len(failures) == 1, failures


def test_conflicts_are_counted_for_the_metrics(harness: Harness) -> None:
    h, kube = harness, harness.kube
    a, b = h.master("a"), h.master("b")
    a.step()
    b.step()

    def conflict(method: str, resource: str, name: str) -> None:
        if resource == "secrets" and method == "PUT":
            kube.before_write = None
            secret = kube.get("secrets", SECRET, NS)
            assert secret is not None
            secret["metadata"].setdefault("annotations", {})["someone"] = "else"
            kube.apply("secrets", secret, NS)

    h.request()
    kube.before_write = conflict
    a.step()
    assert a.store.conflicts == {"secret": 1}  # type: ignore[attr-defined]
    # b's Lease create raced a's: that is a 409 on the leader Lease, counted as "lease".
    kube.delete("leases", "overlay-vici-master", NS)

    def race(method: str, resource: str, name: str) -> None:
        if resource == "leases" and method == "POST" and name == "overlay-vici-master":
            kube.before_write = None
            kube.apply(
                "leases",
                {"metadata": {"name": name}, "spec": {"holderIdentity": "a"}},
                NS,
            )

    kube.before_write = race
    assert b.step() is None
    assert b.store.conflicts == {"lease": 1}  # type: ignore[attr-defined]


def test_the_master_command_serves_metrics_and_records_events(kube: FakeKube) -> None:
    """`overlay-vici master` against the API: its /metrics, /healthz and an Event, wired as
    in the Deployment (a process, its own clock)."""
    import subprocess
    import sys
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    exe = Path(sys.executable).with_name("overlay-vici")
    process = subprocess.Popen(
        [str(exe), "master", "--server", kube.url, "--namespace", NS, "--identity", "m",
         "--tick", "0.2", "--metrics-port", str(port)],
        stderr=subprocess.PIPE,
    )  # fmt: skip

    def samples() -> dict[str, float]:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        except OSError:
            return {}
        found = {}
        for family in text_string_to_metric_families(text.decode()):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                found[s.name + (f"{{{labels}}}" if labels else "")] = s.value
        return found

    try:
        until("the Secret", lambda: kube.get("secrets", SECRET, NS), timeout=20)
        api = ApiServer(kube.url)
        for name in ("n1", "n2", "n3"):
            keyring = kr.loads(
                base64.b64decode(kube.get("secrets", SECRET, NS)["data"]["keyring.json"])
            )
            LeaseReporter(api, NS, name).report(
                {"node": name, "updated": time.time(), "keyring_serial": keyring.serial,
                 "sent_generation": keyring.sent, "reauthenticated": True}
            )  # fmt: skip
        assert main(["rotate", "--server", kube.url, "--namespace", NS]) == 0
        until("a RotationStarted Event", lambda: any(
            e["reason"] == "RotationStarted" for e in events(kube)), timeout=20)  # fmt: skip
        view = until(
            "the stage phase in the metrics",
            lambda: (v := samples()).get('overlay_vici_rotation_phase{phase="stage"}') == 1 and v,
            timeout=20,
        )
        health = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert (health.status, health.read()) == (200, b"ok\n")
    finally:
        process.terminate()
        _, err = process.communicate(timeout=15)
    assert process.returncode == 0, err.decode()
    assert view["overlay_vici_leader"] == 1 and view["overlay_vici_active_generation"] == 1
    assert view['overlay_vici_agents{state="live"}'] == 3
    assert view["overlay_vici_agents_waiting"] == 3


def test_the_enabled_file_switches_every_node_through_the_api(
    kube: FakeKube, tmp_path: Path
) -> None:
    """`overlay-vici master --enabled-file` as in the Deployment: the settings ConfigMap's key
    `enabled` mounted (kubelet's ..data layout, swapped on an edit), a process with its own
    clock. Flipped to false: announced, scheduled once every agent has it, with Events."""
    import subprocess
    import sys

    from overlay_vici.core.files import publish_secret

    settings = tmp_path / "settings"
    publish_secret(settings, {"enabled": "true"})
    exe = Path(sys.executable).with_name("overlay-vici")
    process = subprocess.Popen(
        [str(exe), "master", "--server", kube.url, "--namespace", NS, "--identity", "m",
         "--tick", "0.1", "--metrics-port", "0", "--cutover-lead", "0.5s",
         "--enabled-file", str(settings / "enabled")],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    api = ApiServer(kube.url)

    def keyring() -> kr.Keyring:
        secret = kube.get("secrets", SECRET, NS)
        assert secret is not None
        return kr.loads(base64.b64decode(secret["data"]["keyring.json"]))

    def acked(*_: object) -> kr.Keyring:
        """Every agent reports the keyring now published."""
        current = keyring()
        for name in ("n1", "n2", "n3"):
            LeaseReporter(api, NS, name).report(
                {"node": name, "updated": time.time(), "keyring_serial": current.serial,
                 "sent_generation": current.sent, "reauthenticated": True}
            )  # fmt: skip
        return current

    try:
        until("the Secret", lambda: kube.get("secrets", SECRET, NS), timeout=20)
        # Asked for on at creation: a fresh install's cutover, scheduled once all have it.
        assert keyring().encryption == kr.Encryption(True, None)
        on = until("the switch on", lambda: acked().encryption.at is not None and keyring())
        until("its moment", lambda: on.encryption.mode(time.time()) == "on", timeout=5)
        acked()
        publish_secret(settings, {"enabled": "false"})  # kubectl patch, as kubelet applies it
        announced = until("the announcement", lambda: keyring().encryption.at is None)
        assert announced and keyring().encryption.enabled is False
        view = until(
            "the agents awaited in status",
            lambda: (v := status_view(kube))["waiting"] == ["n1", "n2", "n3"] and v,
        )
        assert view["encryption"] == {
            "enabled": False,
            "mode": "on",
            "at": None,
            "pending": True,
            "lagging": [],
        }
        scheduled = until(
            "the moment", lambda: acked().encryption.at is not None and keyring(), timeout=20
        )
        assert scheduled.encryption.enabled is False
        until("the switch off", lambda: status_view(kube)["encryption"]["mode"] == "off")
        until("the Events", lambda: len(events(kube)) >= 2)
        publish_secret(settings, {"enabled": "perhaps"})
        time.sleep(0.5)  # a few ticks: logged once, nothing published
        assert keyring() == scheduled
    finally:
        process.terminate()
        _, err = process.communicate(timeout=15)
    assert process.returncode == 0, err.decode()
    reasons = [e["reason"] for e in events(kube)]
    assert reasons == ["EncryptionSwitchAnnounced", "EncryptionSwitchScheduled"] * 2
    assert events(kube)[1]["message"].startswith("Every node switches encryption on at ")
    assert events(kube)[3]["message"].startswith("Every node switches encryption off at ")
    lines = [json.loads(line) for line in err.decode().splitlines()]
    logged = [line["event"] for line in lines]
    assert "encryption switch announced" in logged and "encryption switch scheduled" in logged
    rejected = [line for line in lines if line["level"] == "error"]
    assert len(rejected) == 1, rejected
    assert rejected[0]["error"] == (
        f"{settings / 'enabled'} says 'perhaps'; write true or false into it"
    )


def test_the_switchs_events_name_the_moment_and_any_agents_skipped() -> None:
    from overlay_vici.master.events import k8s_event

    scheduled = k8s_event(
        "encryption switch scheduled",
        {"enabled": True, "at": 1_700_000_000.25, "lead": 12.5, "skipped": ["n3"]},
    )
    assert scheduled == (
        "Normal",
        "EncryptionSwitchScheduled",
        "Every node switches encryption on at 2023-11-14T22:13:20Z, 12.5 s from now, "
        "without the agents of n3.",
        None,
    )
    reverted = k8s_event("encryption switch reverted", {"enabled": True})
    assert reverted is not None and reverted[1:] == (
        "EncryptionSwitchReverted",
        "The announced encryption switch was withdrawn before its moment was set: "
        "encryption stays on.",
        None,
    )


def test_public_keys_travel_from_the_agents_leases_into_the_keyring(harness: Harness) -> None:
    """report-lease copies the public key into the Lease (contract.LEASED), the master reads
    it from there and publishes it in the Secret's keyring."""
    h = harness
    master = h.master()
    master.step()
    keys = {n: kr.public_bytes(kr.new_node_key()) for n in ("n1", "n2")}
    for name, pub in keys.items():
        h.ack(name, public_key=base64.b64encode(pub).decode())
    master.step()
    published = {p.name: p.pub for p in h.keyring().peers}
    assert {n: published[n] for n in keys} == keys
    assert all(pub is None for name, pub in published.items() if name not in keys)
