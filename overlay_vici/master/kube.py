"""Kubernetes edges of the master, with the official `kubernetes` client (the [master] extra).

- NodeWatcher: list + watch Nodes (name, InternalIP, opt-out label); 410 Gone -> relist.
- KubeStore: the Secret (keyring.json + master.json, read and replaced with its
  resourceVersion: a 409 is reported as a conflict, never overwritten), the agents' ack
  Leases (written by `overlay-vici report-lease`, see overlay_vici.reporter.lease), leader
  election on a Lease, Kubernetes Events for rotations, switches and failures (`record`;
  what each master event becomes is `k8s_event`, pure), and the operator's encryption
  switch from the settings ConfigMap as mounted into the master (`--enabled-file`).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import threading
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubernetes import client, watch

from overlay_vici.core import log
from overlay_vici.core.contract import (
    AGENT_SELECTOR,
    DEFAULT_SECRET,
    KEYRING_FILE,
    MASTER_FILE,
    OPT_OUT_LABEL,
    STATUS_ANNOTATION,
    AgentReport,
    lease_name,
)
from overlay_vici.master.master import Snapshot, SwitchFile
from overlay_vici.master.rotation import NodeInfo

REQUEST_ANNOTATION = "overlay-vici.io/rotate-requested"
DEFAULT_LEADER_LEASE = "overlay-vici-master"
EVENT_COMPONENT = "overlay-vici-master"


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


def node_info(node: Any, opt_out_label: str) -> NodeInfo:
    labels = node.metadata.labels or {}
    ip = (
        next(
            (
                a.address
                for a in (node.status.addresses or [])
                if a.type == "InternalIP" and "." in a.address
            ),
            None,
        )
        if node.status
        else None
    )
    return NodeInfo(node.metadata.name, ip, labels.get(opt_out_label) == "true")


def _micro_time(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, dt.UTC)


class NodeWatcher:
    """Keeps `nodes` (None until the first list) current; sets `wake` on every change."""

    def __init__(
        self,
        api: client.ApiClient,
        opt_out_label: str = OPT_OUT_LABEL,
        timeout: int = 60,
        wake: threading.Event | None = None,
    ) -> None:
        self.core = client.CoreV1Api(api)
        self.opt_out_label = opt_out_label
        self.timeout = timeout
        self.wake = wake or threading.Event()
        self._nodes: dict[str, NodeInfo] | None = None
        self._lock = threading.Lock()
        self.relists = 0

    @property
    def nodes(self) -> list[NodeInfo] | None:
        with self._lock:
            return None if self._nodes is None else list(self._nodes.values())

    def run(self, stop: threading.Event) -> None:
        version: str | None = None
        backoff = 0.5
        while not stop.is_set():
            try:
                if version is None:
                    listed = self.core.list_node()
                    with self._lock:
                        self._nodes = {
                            n.metadata.name: node_info(n, self.opt_out_label) for n in listed.items
                        }
                    version = listed.metadata.resource_version
                    self.relists += 1
                    self.wake.set()
                stream = watch.Watch()
                for event in stream.stream(
                    self.core.list_node, resource_version=version, timeout_seconds=self.timeout
                ):
                    node = event["object"]
                    version = node.metadata.resource_version
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        with self._lock:
                            assert self._nodes is not None
                            if event["type"] == "DELETED":
                                self._nodes.pop(node.metadata.name, None)
                            else:
                                self._nodes[node.metadata.name] = node_info(
                                    node, self.opt_out_label
                                )
                        self.wake.set()
                    if stop.is_set():
                        stream.stop()
                backoff = 0.5
            except client.ApiException as exc:
                if exc.status == 410:
                    log.info("node watch expired, listing again")
                    version = None
                    continue
                log.error("node watch failed", error=f"{exc.status} {exc.reason}")
                stop.wait(backoff)
                backoff = min(backoff * 2, 30)
            except Exception as exc:  # the connection dropped: watch again from where we were
                log.error("node watch failed", error=str(exc))
                stop.wait(backoff)
                backoff = min(backoff * 2, 30)


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
        self.leader_lease = leader_lease
        self.lease_duration = lease_duration
        self.watcher = watcher
        self._switch = SwitchFile(enabled_file) if enabled_file else None
        self._read: Any = None
        self.conflicts: Counter[str] = Counter()  # 409s, by "secret" and "lease"
        self._lease_uids: dict[str, str] = {}  # node -> its ack Lease's uid, for Events
        self._event_error: str | None = None

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
        """Acquire or renew the leader Lease; a 409 means another replica got there first."""
        try:
            lease = self.coordination.read_namespaced_lease(self.leader_lease, self.namespace)
        except client.ApiException as exc:
            if exc.status != 404:
                raise
            body = {
                "metadata": {"name": self.leader_lease},
                "spec": {
                    "holderIdentity": self.identity,
                    "leaseDurationSeconds": self.lease_duration,
                    "acquireTime": _micro_time(now).isoformat(),
                    "renewTime": _micro_time(now).isoformat(),
                    "leaseTransitions": 0,
                },
            }
            try:
                self.coordination.create_namespaced_lease(self.namespace, body)
                return True
            except client.ApiException as exc2:
                if exc2.status == 409:
                    self.conflicts["lease"] += 1
                    return False
                raise
        spec = lease.spec
        holder = spec.holder_identity or None
        renewed = spec.renew_time.timestamp() if spec.renew_time else 0.0
        expired = now > renewed + (spec.lease_duration_seconds or self.lease_duration)
        if holder not in (None, self.identity) and not expired:
            return False
        if holder != self.identity:
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
            spec.acquire_time = _micro_time(now)
            log.info("taking over the leader lease", previous=holder, expired=expired)
        spec.holder_identity = self.identity
        spec.renew_time = _micro_time(now)
        spec.lease_duration_seconds = self.lease_duration
        try:
            self.coordination.replace_namespaced_lease(self.leader_lease, self.namespace, lease)
            return True
        except client.ApiException as exc:
            if exc.status == 409:
                self.conflicts["lease"] += 1
                return False
            raise

    def release(self) -> None:
        """Give the leader Lease up on a clean stop, so that a standby takes over at once."""
        try:
            lease = self.coordination.read_namespaced_lease(self.leader_lease, self.namespace)
            if lease.spec.holder_identity == self.identity:
                lease.spec.holder_identity = ""
                lease.spec.renew_time = _micro_time(0)
                self.coordination.replace_namespaced_lease(self.leader_lease, self.namespace, lease)
        except client.ApiException:
            pass

    # -- Events -----------------------------------------------------------------------
    def record(self, event: str, fields: Mapping[str, Any]) -> None:
        """A core/v1 Event for a master event that operators should see (`k8s_event`), on
        the Secret (rotations, the keyring) or on the node's ack Lease (its agent). Best
        effort: a failure is logged once and the master goes on."""
        mapped = k8s_event(event, fields)
        if mapped is None:
            return
        kind, reason, message, node = mapped
        if node is None:
            involved = {
                "apiVersion": "v1",
                "kind": "Secret",
                "namespace": self.namespace,
                "name": self.secret,
            }
            uid = self._read.metadata.uid if self._read is not None else None
        else:
            involved = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "namespace": self.namespace,
                "name": lease_name(node),
            }
            uid = self._lease_uids.get(node)
        if uid:  # kubectl describe finds an object's Events by its uid
            involved["uid"] = uid
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        body = {
            "metadata": {
                # As client-go names them: the object's name and a unique suffix.
                "name": f"{involved['name']}.{time.time_ns():x}",
                "namespace": self.namespace,
                "labels": {"app.kubernetes.io/name": "overlay-vici"},
            },
            "involvedObject": involved,
            "type": kind,
            "reason": reason,
            "message": message,
            "source": {"component": EVENT_COMPONENT},
            "reportingComponent": EVENT_COMPONENT,
            "reportingInstance": self.identity,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            self.core.create_namespaced_event(self.namespace, body, _request_timeout=10)
            self._event_error = None
        except Exception as exc:  # an Event is worth less than the master's next step
            error = (
                f"{exc.status} {exc.reason}" if isinstance(exc, client.ApiException) else str(exc)
            )
            if error != self._event_error:
                log.error("cannot record a Kubernetes Event", reason=reason, error=error)
            self._event_error = error


def k8s_event(event: str, fields: Mapping[str, Any]) -> tuple[str, str, str, str | None] | None:
    """The Kubernetes Event for a master event (the log events of overlay_vici.master.rotation, and
    "keyring unusable"): (type, reason, message, node), node naming the agent it is about,
    None for the Secret; None for events that stay in the log. Pure."""
    rotation = fields.get("rotation")
    skipped = fields.get("skipped")
    without = f", without the agents of {', '.join(skipped)}" if skipped else ""
    if event == "rotation started":
        return (
            "Normal",
            "RotationStarted",
            f"Rotation {rotation} started ({fields.get('reason')}): phase stage began, "
            f"generation {fields.get('new')} is accepted but not yet sent.",
            None,
        )
    if event == "rotation phase switch":
        return (
            "Normal",
            "RotationPhaseSwitch",
            f"Rotation {rotation}: phase stage finished{without}; phase switch began, "
            f"generation {fields.get('sent')} is sent and agents reauthenticate.",
            None,
        )
    if event == "rotation phase retire":
        return (
            "Normal",
            "RotationPhaseRetire",
            f"Rotation {rotation}: phase switch finished{without}; phase retire began, "
            "the old generation is removed.",
            None,
        )
    if event == "rotation done":
        return (
            "Normal",
            "RotationDone",
            f"Rotation {rotation} done: phase retire finished{without}; generation "
            f"{fields.get('sent')} is the only key.",
            None,
        )
    state = "on" if fields.get("enabled") else "off"
    if event == "encryption switch announced":
        return (
            "Normal",
            "EncryptionSwitchAnnounced",
            f"Encryption switch to {state} announced: once every live agent has this keyring, "
            "the master schedules the moment all nodes change together.",
            None,
        )
    if event == "encryption switch scheduled":
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(fields.get("at", 0))))
        return (
            "Normal",
            "EncryptionSwitchScheduled",
            f"Every node switches encryption {state} at {at}, "
            f"{fields.get('lead')} s from now{without}.",
            None,
        )
    if event == "encryption switch reverted":
        return (
            "Normal",
            "EncryptionSwitchReverted",
            f"The announced encryption switch was withdrawn before its moment was set: "
            f"encryption stays {state}.",
            None,
        )
    if event == "agent expired, not waiting for it":
        node = str(fields.get("node"))
        return (
            "Warning",
            "AgentExpired",
            f"The agent on node {node} stopped reporting: rotations go on without it, and "
            "new IKE_SAs with its node may fail until it is back.",
            node,
        )
    if event == "agent back or gone":
        node = str(fields.get("node"))
        return (
            "Normal",
            "AgentNotExpired",
            f"The agent on node {node} is no longer expired (it reports again, or its node "
            "left the mesh).",
            node,
        )
    if event == "keyring unusable":
        error = str(fields.get("error"))[:800]
        return (
            "Warning",
            "KeyringUnparseable",
            f"The Secret's keyring cannot be parsed ({error}); agents keep their last good "
            "keys and no rotation runs: fix or delete the Secret.",
            None,
        )
    return None


def _decode(value: str | None) -> str | None:
    return base64.b64decode(value).decode() if value else None


def _encode(text: str) -> str:
    return base64.b64encode(text.encode()).decode()
