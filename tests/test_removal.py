"""The install's removal notice: the DaemonSet's fate (pure), then the watch that writes the
notice, through real HTTP against the fake API server, with the official `kubernetes`
client deleting the DaemonSet as `kubectl delete` does (Background by default)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubefake import FakeKube
from kubernetes.client import AppsV1Api, V1DeleteOptions

from overlay_vici.core import log
from overlay_vici.core.contract import notice_at
from overlay_vici.core.files import read_json
from overlay_vici.master.kube import api_client
from overlay_vici.reporter.lease import ApiServer
from overlay_vici.reporter.removal import Fate, RemovalWatch

NS, DS = "overlay-vici", "overlay-vici-agent"


def daemonset(**meta: Any) -> dict[str, Any]:
    return {"metadata": {"name": DS, **meta}, "spec": {}}


DELETING = {"deletionTimestamp": "2026-11-27T00:00:00Z"}


# --- the fate, from the events a watch delivers ---------------------------------------------


def test_a_background_delete_is_a_removal() -> None:
    fate = Fate()
    assert fate.observe("ADDED", daemonset()) is False
    assert fate.observe("DELETED", daemonset()) is True


def test_a_foreground_delete_is_a_removal_from_its_first_event() -> None:
    fate = Fate()
    fate.observe("ADDED", daemonset())
    assert fate.observe("MODIFIED", daemonset(finalizers=["foregroundDeletion"], **DELETING))
    assert fate.observe("DELETED", daemonset(**DELETING)) is True


def test_an_orphaning_delete_is_not_a_removal_even_once_its_finalizer_is_gone() -> None:
    """--cascade=orphan keeps the pods for a replacement DaemonSet to adopt."""
    fate = Fate()
    fate.observe("ADDED", daemonset())
    assert fate.observe("MODIFIED", daemonset(finalizers=["orphan"], **DELETING)) is False
    assert fate.observe("MODIFIED", daemonset(**DELETING)) is False
    assert fate.observe("DELETED", daemonset(**DELETING)) is False
    assert fate.observe("ADDED", daemonset()) is False  # the replacement


def test_a_daemonset_never_seen_is_unknown_not_removed() -> None:
    """A wrong --daemonset must not switch encryption off."""
    fate = Fate()
    assert fate.observe("ABSENT", None) is None
    fate.observe("ADDED", daemonset())
    assert fate.observe("ABSENT", None) is True  # gone while the watch was reopened


def test_a_recreated_daemonset_withdraws_the_removal() -> None:
    fate = Fate()
    fate.observe("ADDED", daemonset())
    fate.observe("DELETED", daemonset())
    assert fate.observe("ADDED", daemonset()) is False


# --- the watch, against the fake API server -----------------------------------------------


class Watching:
    def __init__(self, kube: FakeKube, notice: Path) -> None:
        self.kube = kube
        self.notice = notice
        self.apps = AppsV1Api(api_client(server=kube.url))
        self.watch = RemovalWatch(ApiServer(kube.url), NS, DS, notice, "node-0")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.watch.run, args=(self.stop,), daemon=True)

    def delete(self, policy: str | None = None) -> None:
        """As kubectl delete does it: through the API, with its propagation policy."""
        body = V1DeleteOptions(propagation_policy=policy) if policy else None
        self.apps.delete_namespaced_daemon_set(DS, NS, body=body)

    def noticed(self, expected: bool, within: float = 5.0) -> bool:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if (notice_at(read_json(self.notice)) is not None) == expected:
                return True
            time.sleep(0.02)
        return False


@pytest.fixture
def watching(tmp_path: Path) -> Iterator[Watching]:
    with FakeKube() as kube:
        kube.apply("daemonsets", daemonset(), NS)
        w = Watching(kube, tmp_path / "run" / "removed.json")
        w.notice.parent.mkdir()
        w.thread.start()
        deadline = time.monotonic() + 5
        while not w.watch.fate.seen and time.monotonic() < deadline:  # listed, as in a pod
            time.sleep(0.01)
        yield w
        w.stop.set()  # the thread is a daemon, as in the container: its watch is left open


def test_kubectl_delete_writes_the_notice_at_once(watching: Watching) -> None:
    assert not watching.noticed(True, within=0.5)
    deleted = time.time()
    watching.delete()
    assert watching.noticed(True)
    at = notice_at(read_json(watching.notice))
    assert at is not None and deleted <= at < deleted + 2.0
    assert watching.notice.stat().st_mode & 0o777 == 0o644  # holds no secret


def test_a_recreated_daemonset_removes_the_notice(watching: Watching) -> None:
    watching.delete("Foreground")
    assert watching.noticed(True)
    watching.kube.apply("daemonsets", daemonset(), NS)
    assert watching.noticed(False)


def test_an_orphaning_delete_writes_no_notice(watching: Watching) -> None:
    watching.delete("Orphan")
    assert watching.kube.get("daemonsets", DS, NS) is None
    assert not watching.noticed(True, within=1.0)


def test_other_daemonsets_and_updates_write_no_notice(watching: Watching) -> None:
    watching.kube.apply("daemonsets", {"metadata": {"name": "calico-node"}}, NS)
    watching.kube.delete("daemonsets", "calico-node", NS)
    watching.kube.apply("daemonsets", daemonset(labels={"rolled": "1"}), NS)  # an update
    assert not watching.noticed(True, within=1.0)


def test_watches_resume_and_relist_after_410_gone(tmp_path: Path) -> None:
    """Watches the server ends are reopened from their resourceVersion; one refused with
    410 Gone (history compacted meanwhile) lists again; a deletion after both is seen."""
    with FakeKube() as kube:
        kube.apply("daemonsets", daemonset(), NS)
        w = Watching(kube, tmp_path / "removed.json")
        w.watch.watch_seconds = 1
        w.thread.start()
        time.sleep(1.5)  # listed, and the watch reopened once
        kube.compact()
        kube.apply("leases", {"metadata": {"name": "unrelated"}}, NS)
        time.sleep(1.5)  # the next reopen is refused with 410 Gone: listed again
        assert not w.noticed(True, within=0.1)
        w.delete()
        assert w.noticed(True)
        w.stop.set()


def test_an_unreachable_api_server_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Fail closed: no notice without a deletion seen, and one error line for the outage."""
    with FakeKube() as kube:
        url = kube.url
    notice = tmp_path / "removed.json"
    watch = RemovalWatch(ApiServer(url), NS, DS, notice, "node-0")
    stop = threading.Event()
    thread = threading.Thread(target=watch.run, args=(stop,), daemon=True)
    log.setup("info")
    thread.start()
    time.sleep(2.5)  # three attempts: 1 s, then 2 s apart
    stop.set()
    thread.join(timeout=5)
    assert not notice.exists()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [entry["event"] for entry in lines] == ["daemonset watch failed"], lines
    assert lines[0]["node"] == "node-0" and "fail closed" in lines[0]["error"]
