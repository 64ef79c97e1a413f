"""The nodes as the master sees them: list + watch Nodes (name, InternalIP, opt-out label);
a 410 Gone relists."""

from __future__ import annotations

import threading
from typing import Any

from kubernetes import client, watch

from overlay_vici.core import log
from overlay_vici.core.contract import OPT_OUT_LABEL
from overlay_vici.master.rotation import NodeInfo


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
