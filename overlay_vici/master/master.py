"""The master's loop: read the Secret, decide (overlay_vici.master.rotation), write it back.

The same loop runs in both modes; only the store differs (overlay_vici.master.local for files,
overlay_vici.master.kube for the Kubernetes API). Every write is conditional on the version that
was read: a conflict means someone else wrote in between, so the loop reads again and
decides again from their state, never overwriting it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from overlay_vici.core import keyring as kr
from overlay_vici.core import log
from overlay_vici.core.contract import AgentReport
from overlay_vici.master.rotation import (
    Decision,
    MasterState,
    NodeInfo,
    Policy,
    decide,
    dumps_state,
    loads_state,
)

CONFLICT_RETRIES = 5


@dataclass(frozen=True)
class Snapshot:
    """The Secret as read: its two files (None if absent), the pending request, a version."""

    keyring: str | None
    master: str | None
    request: str | None
    version: Any  # opaque; None: there is no Secret yet


class Store(Protocol):
    def read(self) -> Snapshot: ...

    def write(self, keyring: str, master: str, version: Any) -> bool:
        """Publish both files if the Secret is still at `version`; False on a conflict."""

    def nodes(self) -> list[NodeInfo] | None:
        """The current nodes, or None while not yet known."""

    def reports(self) -> Mapping[str, AgentReport]: ...

    def desired(self) -> bool | None:
        """The operator's encryption switch; None: keep the keyring's."""

    def is_leader(self, now: float) -> bool:
        """Acquire or renew leadership; only the leader writes."""


@dataclass(frozen=True)
class Parsed:
    keyring: kr.Keyring | None
    state: MasterState | None


def parse(snapshot: Snapshot) -> Parsed:
    """The keyring (KeyringError if present but broken) and the master state (None if
    unreadable)."""
    keyring = kr.loads(snapshot.keyring) if snapshot.keyring is not None else None
    return Parsed(keyring, loads_state(snapshot.master))


class SwitchFile:
    """The operator's switch as a file saying `true` or `false`: local mode's
    STATE/_master/enabled, or the key `enabled` of the settings ConfigMap mounted into the
    master (kubelet updates it in place, so it is read at every step)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._error: str | None = None

    def __call__(self) -> bool | None:
        """The switch; None (keep the keyring's) if the file is missing, or unreadable or
        garbled, which is logged once."""
        try:
            text = self.path.read_bytes().decode(errors="replace").strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            error = f"cannot read {self.path} ({exc.strerror}); check the file or its mount"
        else:
            value = {"true": True, "false": False}.get(text.lower())
            if value is not None:
                self._error = None
                return value
            error = f"{self.path} says {text[:20]!r}; write true or false into it"
        if error != self._error:
            log.error("encryption switch unreadable, keeping the current one", error=error)
        self._error = error
        return None


class Master:
    def __init__(
        self,
        store: Store,
        policy: Policy,
        clock: Callable[[], float] = time.time,
        tick: float = 2.0,
        on_step: Callable[[Master, float], None] | None = None,
        notify: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.store = store
        self.policy = policy
        self.clock = clock
        self.tick = tick
        # Hooks: after every pass of run() (metrics), and for every event an operator
        # should see beyond the log (Kubernetes Events); see overlay_vici.agent.metrics, kube.
        self.on_step = on_step
        self.notify = notify
        self.last: Decision | None = None
        self.leader = False
        self._reported: str | None = None
        self._waiting: tuple[str, ...] | None = None

    def step(self) -> Decision | None:
        """One pass: lead or stand by; if leading, read, decide, write (retrying conflicts)."""
        now = self.clock()
        leader = self.store.is_leader(now)
        if leader != self.leader:
            log.info("leadership acquired" if leader else "leadership lost")
            self.leader = leader
        if not leader:
            return None
        nodes = self.store.nodes()
        for attempt in range(CONFLICT_RETRIES):
            snapshot = self.store.read()
            try:
                parsed = parse(snapshot)
            except kr.KeyringError as exc:
                message = f"the Secret's keyring is unusable ({exc}); fix or delete it"
                if message != self._reported:
                    self._notify("keyring unusable", {"error": str(exc)})
                self._error(message)
                return None
            if parsed.keyring is None and nodes is None:
                return None  # no first keyring before the first node list
            decision = decide(
                parsed.keyring,
                parsed.state,
                nodes,
                self.store.reports(),
                now,
                self.policy,
                snapshot.request,
                self.store.desired(),
            )
            if decision.changed:
                if not self.store.write(
                    kr.dumps(decision.keyring), dumps_state(decision.state), snapshot.version
                ):
                    log.warning("write conflict, reading again", attempt=attempt + 1)
                    continue
                for event, fields in decision.events:
                    log.info(event, **fields)
                    self._notify(event, fields)
                log.info(
                    "keyring published",
                    serial=decision.keyring.serial,
                    phase=decision.state.phase,
                    sent=decision.keyring.sent,
                    generations=[g.id for g in decision.keyring.generations],
                    peers=len(decision.keyring.peers),
                    outside=len(decision.keyring.outside),
                    encryption=decision.keyring.encryption.mode(now),
                    switch_at=decision.keyring.encryption.at,
                )
            announced = decision.keyring.encryption.at is None
            if decision.waiting != self._waiting and (decision.state.rotating or announced):
                log.info(
                    "waiting for agents",
                    phase=decision.state.phase if decision.state.rotating else "cutover",
                    agents=list(decision.waiting[:20]),
                    count=len(decision.waiting),
                )
            self._waiting = decision.waiting
            self._reported = None
            self.last = decision
            return decision
        self._error(f"the Secret changed under every one of {CONFLICT_RETRIES} writes; retrying")
        return None

    def run(self, stop: threading.Event, wake: threading.Event | None = None) -> None:
        wake = wake or threading.Event()
        while not stop.is_set():
            wake.clear()
            started = time.monotonic()
            try:
                self.step()
            except Exception as exc:  # an edge failed (API down, disk full): keep going
                self._error(f"master step failed: {exc}")
            if self.on_step is not None:
                self.on_step(self, time.monotonic() - started)
            wake.wait(self.tick)
            if stop.is_set():
                break

    def _notify(self, event: str, fields: dict[str, Any]) -> None:
        if self.notify is not None:
            try:
                self.notify(event, fields)
            except Exception as exc:  # the hook's own failure must not stop the master
                log.error("event hook failed", event=event, error=str(exc))

    def _error(self, message: str) -> None:
        if message != self._reported:
            log.error("master error", error=message)
        self._reported = message
