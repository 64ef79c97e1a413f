"""`kubectl delete -f` as a switch off: tell each node's agent that the install is going.

A rolling update of the agent DaemonSet and its deletion end the same way for a pod, in a
SIGTERM; only the deletion may turn encryption off (an update must tear nothing down). The
DaemonSet itself tells them apart: it is gone, or being deleted, only when the install is
removed. The report-lease container, which holds the pod's API credentials, watches it and
writes a removal notice next to the agent's report; the agent reads the notice as an "off
now" for its node alone (agent.Agent._mode). Every node's watch hears the deletion within a
fraction of a second, before the garbage collector even deletes the pods, so the nodes switch
off together and the pods then stop with nothing left to tear down.

What is not a removal: a DaemonSet deleted with --cascade=orphan (its pods stay, to be
adopted by a replacement), and a DaemonSet this process never saw (a wrong name must not
turn encryption off). When nothing can be known (API unreachable, access refused), nothing
changes: the node fails closed, and `overlay-vici guard remove` is the way out.
`kubectl delete -f` removes the Role before the DaemonSet; a watch already open keeps
running, which is why it is opened at start and kept open.
"""

from __future__ import annotations

import threading
import time
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from overlay_vici.core import log
from overlay_vici.core.contract import notice_at, notice_body
from overlay_vici.core.files import read_json, write_json
from overlay_vici.reporter.lease import ApiServer

WATCH_SECONDS = 300  # the API server ends a watch after this; the next one resumes from its rv
RETRY_MIN, RETRY_MAX = 1.0, 30.0


@dataclass
class Fate:
    """What the DaemonSet's events say about the install: removed, present, or unknown."""

    seen: bool = False
    orphaning: bool = False
    removed: bool | None = None

    def observe(self, kind: str, obj: dict[str, Any] | None) -> bool | None:
        meta = (obj or {}).get("metadata") or {}
        orphan = "orphan" in (meta.get("finalizers") or [])
        if kind in ("ADDED", "MODIFIED"):
            self.seen = True
            # The garbage collector drops the orphan finalizer before the object goes:
            # once seen, it marks the whole deletion.
            deleting = bool(meta.get("deletionTimestamp"))
            self.orphaning = deleting and (orphan or self.orphaning)
            self.removed = deleting and not self.orphaning
        elif kind == "DELETED":
            self.removed = not (orphan or self.orphaning)
        elif kind == "ABSENT" and self.seen:  # gone while the watch was being reopened
            self.removed = not self.orphaning
        return self.removed


class RemovalWatch:
    """Keeps the notice file in step with the DaemonSet's fate."""

    def __init__(
        self,
        api: ApiServer,
        namespace: str,
        daemonset: str,
        notice: Path,
        node: str,
        clock: Callable[[], float] = time.time,
        watch_seconds: int = WATCH_SECONDS,
    ) -> None:
        self.api = api
        self.daemonset = daemonset
        self.notice = notice
        self.node = node
        self.clock = clock
        self.watch_seconds = watch_seconds
        self.fate = Fate()
        selector = quote(f"metadata.name={daemonset}", safe="")
        self._list = f"/apis/apps/v1/namespaces/{namespace}/daemonsets?fieldSelector={selector}"

    def run(self, stop: threading.Event) -> None:
        retry, reported = RETRY_MIN, None
        while not stop.is_set():
            try:
                self._follow(stop)
                retry, reported = RETRY_MIN, None
            except (urllib.error.URLError, OSError, ValueError) as exc:
                error = _describe(exc)
                if error != reported:
                    log.error(
                        "daemonset watch failed",
                        node=self.node,
                        daemonset=self.daemonset,
                        error=f"{error}; the node stays as it is (fail closed), retrying",
                    )
                reported = error
                stop.wait(retry)
                retry = min(retry * 2, RETRY_MAX)

    def _follow(self, stop: threading.Event) -> None:
        """One list, then watches from its resourceVersion on, until one fails or says 410."""
        listed = self.api.request("GET", self._list)
        items = listed.get("items") or []
        self._record(*(("ADDED", items[0]) if items else ("ABSENT", None)))
        version = listed.get("metadata", {}).get("resourceVersion", "")
        while not stop.is_set():  # each watch resumes where the last one ended
            query = f"&watch=true&timeoutSeconds={self.watch_seconds}&resourceVersion={version}"
            for event in self.api.stream(self._list + query, self.watch_seconds + 30):
                if event.get("type") == "ERROR":  # 410 Gone and the like: list again
                    return
                obj = event.get("object") or {}
                version = obj.get("metadata", {}).get("resourceVersion", version)
                self._record(event.get("type", ""), obj)
                if stop.is_set():
                    return

    def _record(self, kind: str, obj: dict[str, Any] | None) -> None:
        before = self.fate.removed
        removed = self.fate.observe(kind, obj)
        noticed = notice_at(read_json(self.notice)) is not None
        if removed and not noticed:
            write_json(self.notice, notice_body(self.clock(), self.daemonset))
            log.warning(
                "install removed, switching this node off",
                node=self.node,
                daemonset=self.daemonset,
            )
        elif removed is False and noticed:
            self.notice.unlink(missing_ok=True)
            log.info("install present again", node=self.node, daemonset=self.daemonset)
        elif removed is None and before is None and kind == "ABSENT":
            log.warning(
                "daemonset not found",
                node=self.node,
                daemonset=self.daemonset,
                error="never seen, so not taken as a removal; check --daemonset",
            )


def _describe(exc: Exception) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} from the API server"
    return str(exc) or type(exc).__name__
