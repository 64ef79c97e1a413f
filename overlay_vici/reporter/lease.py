"""The agent's acknowledgement and heartbeat as a Lease, with the standard library only.

`overlay-vici report-lease` runs beside the agent (a second container of its pod, same
image, no `kubernetes` package needed) and copies the agent's status report into the
Lease `overlay-vici-agent-<node>`: the report in an annotation, its `updated` time as
the Lease's renewTime. A hung or dead agent stops updating its report, so its Lease
expires even though this process lives on.
"""

from __future__ import annotations

import json
import os
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from overlay_vici.core import log
from overlay_vici.core.contract import (
    AGENT_LABEL,
    AGENT_LABEL_VALUE,
    SERVICE_ACCOUNT,
    STATUS_ANNOTATION,
    lease_name,
    leased,
)
from overlay_vici.core.files import read_json


class LeaseError(RuntimeError):
    """The API server refused or could not be reached; one sentence."""


@dataclass(frozen=True)
class ApiServer:
    url: str
    token_file: Path | None = None
    ca_file: Path | None = None

    @classmethod
    def in_cluster(cls) -> ApiServer:
        host, port = (
            os.environ.get("KUBERNETES_SERVICE_HOST"),
            os.environ.get("KUBERNETES_SERVICE_PORT", "443"),
        )
        if not host:
            raise LeaseError("not in a pod (no KUBERNETES_SERVICE_HOST); pass --server")
        if ":" in host:
            host = f"[{host}]"
        return cls(f"https://{host}:{port}", SERVICE_ACCOUNT / "token", SERVICE_ACCOUNT / "ca.crt")

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One JSON request; an HTTP error raises urllib.error.HTTPError (code in .code)."""
        with self._open(method, path, body, timeout=10) as response:
            return json.loads(response.read())

    def stream(self, path: str, timeout: float) -> Iterator[dict[str, Any]]:
        """A watch: one JSON event per line until the server ends it."""
        with self._open("GET", path, None, timeout) as response:
            for line in response:
                if line.strip():
                    yield json.loads(line)

    def _open(self, method: str, path: str, body: dict[str, Any] | None, timeout: float) -> Any:
        headers = {"Accept": "application/json", "Content-Type": "application/json"}
        if self.token_file:  # re-read every time: bound service-account tokens rotate
            headers["Authorization"] = f"Bearer {self.token_file.read_text().strip()}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data, headers, method=method)
        context = ssl.create_default_context(cafile=self.ca_file) if self.ca_file else None
        return urllib.request.urlopen(req, timeout=timeout, context=context)


def _micro_time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseReporter:
    """Writes one node's ack Lease: create if absent, else replace with its resourceVersion."""

    def __init__(self, api: ApiServer, namespace: str, node: str, duration: int = 90) -> None:
        self.api = api
        self.node = node
        self.duration = duration
        self.path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"

    def report(self, status: dict[str, Any]) -> None:
        subset = leased(status, self.node)
        spec = {
            "holderIdentity": self.node,
            "leaseDurationSeconds": self.duration,
            "renewTime": _micro_time(float(status.get("updated") or time.time())),
        }
        annotations = {STATUS_ANNOTATION: json.dumps(subset, sort_keys=True)}
        name = lease_name(self.node)
        for _ in range(3):
            try:
                lease = self.api.request("GET", f"{self.path}/{name}")
            except urllib.error.HTTPError as exc:
                if exc.code != 404:
                    raise LeaseError(f"reading Lease {name} failed: HTTP {exc.code}") from None
                lease = None
            try:
                if lease is None:
                    body = {
                        "apiVersion": "coordination.k8s.io/v1",
                        "kind": "Lease",
                        "metadata": {
                            "name": name,
                            "labels": {AGENT_LABEL: AGENT_LABEL_VALUE},
                            "annotations": annotations,
                        },
                        "spec": spec,
                    }
                    self.api.request("POST", self.path, body)
                else:
                    meta = lease.setdefault("metadata", {})
                    meta.setdefault("labels", {})[AGENT_LABEL] = AGENT_LABEL_VALUE
                    meta.setdefault("annotations", {}).update(annotations)
                    lease["spec"] = {**lease.get("spec", {}), **spec}
                    self.api.request("PUT", f"{self.path}/{name}", lease)
                return
            except urllib.error.HTTPError as exc:
                if exc.code != 409:  # someone else wrote in between: read again
                    raise LeaseError(f"writing Lease {name} failed: HTTP {exc.code}") from None
        raise LeaseError(f"Lease {name} changed under every attempt; will retry")


def run_reporter(
    reporter: LeaseReporter,
    status_path: Path,
    stop: threading.Event,
    heartbeat: float = 20.0,
    poll: float = 1.0,
    clock: Callable[[], float] = time.time,
) -> None:
    """Copy the agent's report into the Lease: at once when what it acknowledges changes,
    else at most every `heartbeat` seconds, and never when the agent stopped updating it."""
    last_written: dict[str, Any] | None = None
    written_at = 0.0
    reported_error: str | None = None
    while not stop.is_set():
        status = read_json(status_path)
        if status and status.get("updated") != (last_written or {}).get("updated"):
            acks = _acks(status) != _acks(last_written or {})
            if acks or clock() - written_at >= heartbeat:
                try:
                    reporter.report(status)
                    last_written, written_at, reported_error = status, clock(), None
                except (LeaseError, OSError) as exc:
                    if str(exc) != reported_error:
                        log.error("lease report failed", node=reporter.node, error=str(exc))
                    reported_error = str(exc)
        stop.wait(poll)


def _acks(status: dict[str, Any]) -> tuple[Any, ...]:
    keys = ("keyring_serial", "sent_generation", "reauthenticated", "stale_ike_sas", "stale_peers")
    return tuple(json.dumps(status.get(k), sort_keys=True) for k in keys)
