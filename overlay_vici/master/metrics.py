"""The master's Prometheus metrics (docs/operations.md, "Monitoring").

Pure: `master_families` (the master's last decision -> metric values). `MasterMetrics` is
the edge: fed after every loop pass (Master.on_step), it serves its registry on /metrics
(overlay_vici.core.metrics.serve).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from overlay_vici.core import log
from overlay_vici.core.contract import PHASES
from overlay_vici.core.metrics import Collector, Family, gauge, labelled, registry_with_steps

if TYPE_CHECKING:
    from overlay_vici.master.master import Master
    from overlay_vici.master.rotation import Decision


def master_families(
    leader: bool, decision: Decision | None, conflicts: Mapping[str, int]
) -> list[Family]:
    """The master's metrics: whether it leads, the API conflicts it met, and, while it leads,
    the mesh as its last decision left it (generation, rotation phase and timings, agents).
    Pure."""
    families = [
        *gauge(
            "leader",
            "1 while this replica holds the leader Lease (only the leader writes)",
            1 if leader else 0,
        ),
        labelled(
            "api_conflicts_total",
            "counter",
            "writes refused with 409 Conflict, by resource (local mode: the state directory "
            "changed under a write)",
            ("resource",),
            [((resource,), conflicts.get(resource, 0)) for resource in ("secret", "lease")],
        ),
    ]
    if not leader or decision is None:
        return families
    state, keyring = decision.state, decision.keyring
    peers = len(keyring.peers)
    history = state.history[-1] if state.history else {}
    current = history if history.get("rotation") == state.rotation else {}
    done = [h for h in state.history if "idle" in h]
    last_done = done[-1] if done else {}
    durations = [
        (phase, last_done[nxt] - last_done[phase])
        for phase, nxt in (("stage", "switch"), ("switch", "retire"), ("retire", "idle"))
        if phase in last_done and nxt in last_done
    ]
    families += [
        *gauge(
            "active_generation", "the key generation agents authenticate with (sent)", keyring.sent
        ),
        *gauge("keyring_serial", "serial of the published keyring", keyring.serial),
        labelled(
            "rotation_phase",
            "gauge",
            "1 for the rotation phase the mesh is in (idle: no rotation under way)",
            ("phase",),
            [((phase,), 1 if state.phase == phase else 0) for phase in PHASES],
        ),
        labelled(
            "rotations_completed_total",
            "counter",
            "key rotations that reached their end (retire acknowledged)",
            (),
            [((), state.rotation - (1 if state.rotating else 0))],
        ),
        *gauge(
            "rotation_phase_started_timestamp_seconds",
            "when the current rotation phase began",
            current.get(state.phase) if state.rotating else None,
        ),
        labelled(
            "rotation_phase_duration_seconds",
            "gauge",
            "how long each phase of the last completed rotation took",
            ("phase",),
            [((phase,), seconds) for phase, seconds in durations],
        ),
        *gauge(
            "last_rotation_timestamp_seconds",
            "when the last rotation ended (or the mesh began)",
            state.last_rotation,
        ),
        labelled(
            "agents",
            "gauge",
            "agents of the peers by state: live (reported within --agent-timeout), expired, "
            "absent (never reported)",
            ("state",),
            [
                (("live",), peers - len(decision.expired) - len(decision.absent)),
                (("expired",), len(decision.expired)),
                (("absent",), len(decision.absent)),
            ],
        ),
        *gauge(
            "agents_waiting",
            "live agents the current rotation phase waits for",
            len(decision.waiting),
        ),
    ]
    return families


class MasterMetrics:
    """The master's registry, fed by `observe` after every loop pass (Master.on_step)."""

    def __init__(self, tick: float, clock: Callable[[], float] = time.time) -> None:
        self.tick = tick
        self.clock = clock
        self.registry, self.step_duration = registry_with_steps(
            "master_step_duration_seconds",
            "duration of the master's passes (lead, read, decide, write)",
        )
        self._lock = threading.Lock()
        self._leader = False
        self._decision: Decision | None = None
        self._conflicts: dict[str, int] = {}
        self._last_pass = clock()  # the loop starts now: healthy until it stalls
        self.registry.register(Collector(self.families))

    @property
    def stale_after(self) -> float:
        return max(30.0, 5 * self.tick)

    def observe(self, master: Master, seconds: float) -> None:
        try:
            conflicts = dict(getattr(master.store, "conflicts", {}) or {})
            with self._lock:
                self._leader, self._decision = master.leader, master.last
                self._conflicts = conflicts
                self._last_pass = self.clock()
            self.step_duration.observe(seconds)
        except Exception as exc:
            log.error("metrics update failed", error=f"{type(exc).__name__}: {exc}")

    def families(self) -> list[Family]:
        with self._lock:
            return master_families(self._leader, self._decision, self._conflicts)

    def health(self) -> tuple[bool, str]:
        """Healthy while the loop passes (leader or not)."""
        with self._lock:
            age = self.clock() - self._last_pass
        if age > self.stale_after:
            return False, f"the master's loop last passed {age:.0f}s ago"
        return True, "ok"
