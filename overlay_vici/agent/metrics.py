"""The agent's Prometheus metrics (docs/operations.md, "Monitoring").

Pure: `agent_families` (the agent's status report, per-peer SA state and counts -> metric
values), `charon_event` (a VICI event -> what it counts), `peer_sa_up` and `ReauthTracker`
(reauthentications requested -> completed, from successive IKE_SA lists). `AgentMetrics` is
the edge: fed after every step (AgentConfig.on_step) and by charon's events, it serves its
registry on /metrics (overlay_vici.core.metrics.serve).
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from overlay_vici.core import log
from overlay_vici.core.contract import MODES, conn_name
from overlay_vici.core.metrics import Collector, Family, gauge, labelled, registry_with_steps

if TYPE_CHECKING:
    from overlay_vici.agent.agent import StepReport
    from overlay_vici.agent.sa_plan import IkeSa
    from overlay_vici.core.keyring import Keyring

AUTH_REASONS = ("mismatch", "no_key", "rejected")


@dataclass
class AgentCounts:
    """What the agent counts between status reports (monotonic)."""

    auth_failures: Counter[str] = field(default_factory=Counter)  # by AUTH_REASONS
    rekeys: Counter[str] = field(default_factory=Counter)  # "ike", "child"
    vici_errors: Mapping[str, int] = field(default_factory=dict)  # by VICI command
    reauth_requests: int = 0
    reauths_completed: int = 0
    events_connected: bool = False


def agent_families(
    status: Mapping[str, Any],
    peer_up: Mapping[str, bool],
    counts: AgentCounts,
    last_success: float | None,
) -> list[Family]:
    """The agent's metrics from its status report (Agent.status()), whether each peer's SAs
    are up, its counts, and when its last step succeeded. Pure."""
    generations = status.get("generations") or {}
    families = [
        labelled(
            "peer_sa_up",
            "gauge",
            "1 if an established IKE_SA with an installed CHILD_SA carries this peer",
            ("peer",),
            [((peer,), up) for peer, up in sorted(peer_up.items())],
        ),
        *gauge(
            "peers_expected",
            "peers with a connection loaded: the keyring's other nodes that have a key",
            status.get("peers_expected", 0),
        ),
        *gauge(
            "peers_without_key",
            "peers with no connection: their public key, or this node's, is not published yet",
            status.get("peers_without_key", 0),
        ),
        *gauge(
            "peers_up",
            "peers carried by an established IKE_SA with an installed CHILD_SA",
            status.get("peers_up", 0),
        ),
        *gauge(
            "ike_sas", "IKE_SAs of the agent's connections, in any state", status.get("ike_sas", 0)
        ),
        *gauge(
            "stale_ike_sas",
            "IKE_SAs authenticated before the sent generation changed, not yet reauthenticated",
            status.get("stale_ike_sas", 0),
        ),
        labelled(
            "generation",
            "gauge",
            "1 for each key generation loaded, by role: sent (used to authenticate) or accepted",
            ("generation", "role"),
            [((g, role), 1) for g, role in sorted(generations.items())],
        ),
        *gauge(
            "keyring_serial",
            "serial of the keyring loaded into charon",
            status.get("keyring_serial"),
        ),
        labelled(
            "encryption_mode",
            "gauge",
            "1 for the mode of the cluster-wide switch this node is in: on, prepare (keys "
            "loaded and SAs up, nothing enforced yet), off",
            ("mode",),
            [((mode,), status.get("encryption") == mode) for mode in MODES],
        ),
        *gauge(
            "guard_installed",
            "1 while the guard that drops unprotected IPIP is installed (as last verified)",
            None if status.get("guard") is None else int(bool(status["guard"]["installed"])),
        ),
        *gauge(
            "charon_connected",
            "1 while the agent's VICI session to charon is up",
            1 if status.get("charon_connected") else 0,
        ),
        *gauge(
            "events_connected",
            "1 while the agent is subscribed to charon's events (rekeys, authentication failures)",
            1 if counts.events_connected else 0,
        ),
        labelled(
            "ike_auth_failures_total",
            "counter",
            "IKE authentications that failed at this node: mismatch (the peer's AUTH did not "
            "verify with any key held), no_key (no key for the peer), rejected (the peer "
            "refused ours)",
            ("reason",),
            [((reason,), counts.auth_failures.get(reason, 0)) for reason in AUTH_REASONS],
        ),
        labelled(
            "rekeys_total",
            "counter",
            "IKE_SA and CHILD_SA rekeyings at this node",
            ("sa",),
            [((sa,), counts.rekeys.get(sa, 0)) for sa in ("ike", "child")],
        ),
        labelled(
            "reauth_requests_total",
            "counter",
            "reauthentications of stale IKE_SAs the agent asked charon for",
            (),
            [((), counts.reauth_requests)],
        ),
        labelled(
            "reauths_completed_total",
            "counter",
            "of those, the ones whose old IKE_SA is gone with an established one in its place",
            (),
            [((), counts.reauths_completed)],
        ),
        labelled(
            "vici_errors_total",
            "counter",
            "VICI requests charon refused or that failed, by command (connect: no session)",
            ("command",),
            [((command,), n) for command, n in sorted(counts.vici_errors.items())],
        ),
        *gauge(
            "last_success_timestamp_seconds",
            "when the agent last finished a step with charon connected and no error",
            last_success,
        ),
    ]
    return families


def peer_sa_up(keyring: Keyring | None, node: str, sas: Iterable[IkeSa]) -> dict[str, bool]:
    """Per peer of `node` in the keyring: does an established IKE_SA with an installed
    CHILD_SA exist on its connection?"""
    if keyring is None:
        return {}
    up = {sa.conn for sa in sas if sa.state == "ESTABLISHED" and sa.children_installed}
    return {p.name: conn_name(p.name) in up for p in keyring.peers if p.name != node}


class ReauthTracker:
    """Counts the reauthentications requested and completed. A request (an IKE_SA's unique
    id) completes once that IKE_SA is gone from charon's list while an established IKE_SA
    with an installed CHILD_SA carries its connection. Requests on connections no longer
    loaded are forgotten."""

    def __init__(self) -> None:
        self.requested = 0
        self.completed = 0
        self.pending: dict[str, str] = {}  # unique id -> connection

    def observe(self, requested: Iterable[str], sas: Iterable[IkeSa], conns: Iterable[str]) -> None:
        """`requested`: ids asked for since the last call, chosen from `sas`, charon's list
        at this step; `conns`: the connections loaded."""
        current = list(sas)
        known = {sa.unique_id: sa.conn for sa in current}
        for unique_id in requested:
            self.requested += 1
            if unique_id in known:
                self.pending[unique_id] = known[unique_id]
        present = {sa.unique_id for sa in current}
        up = {sa.conn for sa in current if sa.state == "ESTABLISHED" and sa.children_installed}
        loaded = set(conns)
        for unique_id, conn in list(self.pending.items()):
            if conn not in loaded:
                del self.pending[unique_id]
            elif unique_id not in present and conn in up:
                del self.pending[unique_id]
                self.completed += 1


# charon's log lines (level <= 1) that mean an IKE authentication failed at this node, and
# the bytes that pick them out of the raw events (EventWatcher's log_filter).
AUTH_LOG_MARKERS = (b"MAC mismatched", b"no shared key found", b"AUTHENTICATION_FAILED notify")
_AUTH_PATTERNS = (
    (re.compile(r"^tried \d+ shared keys? for .* but MAC mismatched"), "mismatch"),
    (re.compile(r"^no shared key found for "), "no_key"),
    (re.compile(r"^received AUTHENTICATION_FAILED notify"), "rejected"),
)


def charon_event(name: str, message: Mapping[str, Any]) -> tuple[str, str] | None:
    """What a VICI event counts, as (counter, label): ("rekeys", "ike"|"child") for the
    ike-rekey/child-rekey events, ("auth_failures", reason) for the log lines of a failed
    IKE authentication; None for anything else. Pure."""
    if name == "ike-rekey":
        return "rekeys", "ike"
    if name == "child-rekey":
        return "rekeys", "child"
    if name == "log":
        text = str(message.get("msg", ""))
        for pattern, reason in _AUTH_PATTERNS:
            if pattern.search(text):
                return "auth_failures", reason
    return None


class AgentMetrics:
    """The agent's registry, fed by `observe` after every step (AgentConfig.on_step) and by
    `on_event` from the VICI event thread; `health` for /healthz."""

    def __init__(self, resync: float, clock: Callable[[], float] = time.time) -> None:
        self.resync = resync
        self.clock = clock
        self.registry, self.reconcile = registry_with_steps(
            "reconcile_duration_seconds",
            "duration of the agent's reconcile passes (keyring, charon, SAs)",
        )
        self.counts = AgentCounts()
        self.reauths = ReauthTracker()
        self.events: Any = None  # the EventWatcher, for events_connected
        self._lock = threading.Lock()
        self._status: dict[str, Any] = {}
        self._peer_up: dict[str, bool] = {}
        self._last_step: float | None = None
        self._last_success: float | None = None
        self._started = clock()
        self.registry.register(Collector(self.families))

    def observe(self, report: StepReport, seconds: float) -> None:
        """After every step, in the agent's thread, from its report; never raises into the
        agent."""
        try:
            status = report.status
            peer_up = peer_sa_up(report.keyring, status["node"], report.sas)
            now = self.clock()
            with self._lock:
                self.reauths.observe(report.reauth_requested, report.sas, report.conns)
                self._status, self._peer_up = dict(status), peer_up
                self.counts.vici_errors = dict(report.vici_errors)
                self._last_step = now
                if status.get("charon_connected") and not status.get("last_error"):
                    self._last_success = now
            self.reconcile.observe(seconds)
        except Exception as exc:  # metrics must never stop the agent
            log.error("metrics update failed", error=f"{type(exc).__name__}: {exc}")

    def on_event(self, name: str, message: Mapping[str, Any]) -> None:
        counted = charon_event(name, message)
        if counted is None:
            return
        counter, label = counted
        with self._lock:
            getattr(self.counts, counter)[label] += 1
        if counter == "auth_failures":
            log.warning(
                "IKE authentication failed",
                reason=label,
                peer=message.get("ikesa-name"),
                detail=message.get("msg"),
            )

    def families(self) -> list[Family]:
        with self._lock:
            counts = AgentCounts(
                auth_failures=Counter(self.counts.auth_failures),
                rekeys=Counter(self.counts.rekeys),
                vici_errors=dict(self.counts.vici_errors),
                reauth_requests=self.reauths.requested,
                reauths_completed=self.reauths.completed,
                events_connected=bool(self.events is not None and self.events.connected),
            )
            return agent_families(self._status, self._peer_up, counts, self._last_success)

    def health(self) -> tuple[bool, str]:
        """Healthy while the last step ended within three resync intervals with charon
        connected."""
        with self._lock:
            last, connected = self._last_step, bool(self._status.get("charon_connected"))
        now = self.clock()
        if last is None:
            return False, "no step finished yet"
        if now - last > 3 * self.resync:
            return False, f"the last step finished {now - last:.0f}s ago"
        if not connected:
            return False, "charon is not connected"
        return True, "ok"
