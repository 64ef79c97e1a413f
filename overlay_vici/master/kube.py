"""The master's Store over the Kubernetes API, with the official `kubernetes` client (the
[master] extra).

KubeStore: the Secret (keyring.json + master.json, read and replaced with its
resourceVersion: a 409 is reported as a conflict, never overwritten), the agents' ack Leases
(written by `overlay-vici report-lease`, see overlay_vici.reporter.lease) and the
operator's encryption switch from the settings ConfigMap as mounted into the master
(`--enabled-file`). It delegates the rest: the nodes to a NodeWatcher
(overlay_vici.master.nodes), leadership to a LeaderElection (.leader), Kubernetes Events to
an EventRecorder (.events).
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubernetes import client

from overlay_vici.core.contract import (
    AGENT_SELECTOR,
    DEFAULT_SECRET,
    KEYRING_FILE,
    MASTER_FILE,
    STATUS_ANNOTATION,
    AgentReport,
)
from overlay_vici.master.events import EventRecorder
from overlay_vici.master.leader import DEFAULT_LEADER_LEASE, LeaderElection
from overlay_vici.master.master import Snapshot, SwitchFile
from overlay_vici.master.nodes import NodeWatcher
from overlay_vici.master.rotation import NodeInfo

REQUEST_ANNOTATION = "overlay-vici.io/rotate-requested"


class KubeError(RuntimeError):
    """A Kubernetes call failed in a way the command cannot go past; one sentence."""


def api_client(kubeconfig: str | None = None, server: str | None = None) -> client.ApiClient:
    """In-cluster config when run in a pod, else the kubeconfig (or `server`, plain, for tests)."""
    from kubernetes import config

    if server:
        return client.ApiClient(client.Configuration(host=server))
    if kubeconfig is None:
        try:
            config.load_incluster_config()
            return client.ApiClient()
        except config.ConfigException:
            pass
    try:
        config.load_kube_config(config_file=kubeconfig)
    except (config.ConfigException, OSError) as exc:
        raise KubeError(f"no Kubernetes configuration found ({exc}); pass --kubeconfig") from None
    return client.ApiClient()


class KubeStore:
    """The master's Store over the Kubernetes API."""

    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        secret: str = DEFAULT_SECRET,
        identity: str = "master",
        leader_lease: str = DEFAULT_LEADER_LEASE,
        lease_duration: int = 15,
        watcher: NodeWatcher | None = None,
        enabled_file: Path | None = None,
    ) -> None:
        self.core = client.CoreV1Api(api)
        self.coordination = client.CoordinationV1Api(api)
        self.namespace = namespace
        self.secret = secret
        self.identity = identity
        self.watcher = watcher
        self._switch = SwitchFile(enabled_file) if enabled_file else None
        self._read: Any = None
        self.conflicts: Counter[str] = Counter()  # 409s, by "secret" and "lease"
        self._lease_uids: dict[str, str] = {}  # node -> its ack Lease's uid, for Events
        self.leader = LeaderElection(
            api, namespace, identity, self.conflicts, leader_lease, lease_duration
        )
        self.events = EventRecorder(api, namespace, identity)

    # -- the Secret -------------------------------------------------------------------
    def read(self) -> Snapshot:
        try:
            secret = self.core.read_namespaced_secret(self.secret, self.namespace)
        except client.ApiException as exc:
            if exc.status == 404:
                self._read = None
                return Snapshot(None, None, None, None)
            raise
        self._read = secret
        data = secret.data or {}
        annotations = secret.metadata.annotations or {}
        return Snapshot(
            keyring=_decode(data.get(KEYRING_FILE)),
            master=_decode(data.get(MASTER_FILE)),
            request=annotations.get(REQUEST_ANNOTATION),
            version=secret.metadata.resource_version,
        )

    def write(self, keyring: str, master: str, version: Any) -> bool:
        data = {KEYRING_FILE: _encode(keyring), MASTER_FILE: _encode(master)}
        try:
            if version is None:
                body = {
                    "metadata": {
                        "name": self.secret,
                        "labels": {"app.kubernetes.io/name": "overlay-vici"},
                    },
                    "type": "Opaque",
                    "data": data,
                }
                self.core.create_namespaced_secret(self.namespace, body)
                return True
            current = self._read
            if current is None or current.metadata.resource_version != version:
                return False
            # Everything else in the object (labels, annotations, other keys) stays as read.
            current.data = {**(current.data or {}), **data}
            self.core.replace_namespaced_secret(self.secret, self.namespace, current)
            return True
        except client.ApiException as exc:
            if exc.status == 409:
                self.conflicts["secret"] += 1
                return False
            raise

    def request_rotation(self, token: str, attempts: int = 5) -> None:
        """Annotate the Secret with an on-demand request (read-modify-write, 409: again)."""
        for _ in range(attempts):
            try:
                secret = self.core.read_namespaced_secret(self.secret, self.namespace)
            except client.ApiException as exc:
                if exc.status == 404:
                    raise KubeError(
                        f"no Secret {self.namespace}/{self.secret}; is the master running?"
                    ) from None
                raise
            annotations = dict(secret.metadata.annotations or {})
            annotations[REQUEST_ANNOTATION] = token
            secret.metadata.annotations = annotations
            try:
                self.core.replace_namespaced_secret(self.secret, self.namespace, secret)
                return
            except client.ApiException as exc:
                if exc.status != 409:
                    raise
        raise KubeError(f"the Secret changed under every one of {attempts} attempts; try again")

    # -- nodes and reports ------------------------------------------------------------
    def nodes(self) -> list[NodeInfo] | None:
        return self.watcher.nodes if self.watcher else None

    def reports(self) -> Mapping[str, AgentReport]:
        leases = self.coordination.list_namespaced_lease(
            self.namespace, label_selector=AGENT_SELECTOR
        )
        reports: dict[str, AgentReport] = {}
        for lease in leases.items:
            raw = (lease.metadata.annotations or {}).get(STATUS_ANNOTATION)
            try:
                doc = json.loads(raw) if raw else None
            except ValueError:
                doc = None
            report = AgentReport.from_status(doc) if isinstance(doc, dict) else None
            if report is not None and report.node == (
                lease.spec.holder_identity if lease.spec else None
            ):
                reports[report.node] = report
                self._lease_uids[report.node] = lease.metadata.uid
        return reports

    def desired(self) -> bool | None:
        return self._switch() if self._switch else None

    # -- leader election --------------------------------------------------------------
    def is_leader(self, now: float) -> bool:
        return self.leader.is_leader(now)

    def release(self) -> None:
        self.leader.release()

    # -- Events -----------------------------------------------------------------------
    def record(self, event: str, fields: Mapping[str, Any]) -> None:
        """Master.notify: the event as a Kubernetes Event (overlay_vici.master.events)."""
        uid = self._read.metadata.uid if self._read is not None else None
        self.events.record(event, fields, (self.secret, uid), self._lease_uids)


def _decode(value: str | None) -> str | None:
    return base64.b64decode(value).decode() if value else None


def _encode(text: str) -> str:
    return base64.b64encode(text.encode()).decode()
