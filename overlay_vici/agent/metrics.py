"""Prometheus metrics and /healthz for the agent and the master.

Pure: `agent_families` (the agent's status report, per-peer SA state and counts -> metric
values), `master_families` (the master's last decision -> metric values), `charon_event`
(a VICI event -> what it counts), `peer_sa_up` and `ReauthTracker` (reauthentications
requested -> completed, from successive IKE_SA lists). The rest is the edge: `AgentMetrics`
and `MasterMetrics` are fed after every step (hooks in the agent's and master's loops) and
serve their registry on /metrics, and `serve` is the small HTTP server that also answers
/healthz. Every metric is documented in docs/operations.md ("Monitoring").

No `kubernetes` here: the agent imports this module.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from overlay_vici.core import log

if TYPE_CHECKING:
    from overlay_vici.agent.agent import Agent
    from overlay_vici.agent.sa_plan import IkeSa
    from overlay_vici.core.keyring import Keyring
    from overlay_vici.master.master import Master
    from overlay_vici.master.rotation import Decision

PREFIX = "overlay_vici_"
# The classic text format, which every Prometheus reads (our names need no escaping, so the
# body is the same in its successor, 1.0.0).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
AGENT_PORT = 9541
MASTER_PORT = 9540
AUTH_REASONS = ("mismatch", "no_key", "rejected")
PHASES = ("idle", "stage", "switch", "retire")
# Reconcile passes take milliseconds; a pass that loads 1,000 peers takes seconds.
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class Family:
    """One metric family's values: the pure functions' output, turned into Prometheus
    families by `to_prometheus`. `name` carries the `_total` of a counter."""

    name: str
    kind: str  # "gauge" or "counter"
    help: str
    labels: tuple[str, ...] = ()
    samples: tuple[tuple[tuple[str, ...], float], ...] = ()


def _gauge(name: str, help: str, value: float | None) -> list[Family]:
    return [] if value is None else [Family(PREFIX + name, "gauge", help, (), (((), value),))]


def _labelled(
    name: str, kind: str, help: str, labels: tuple[str, ...], samples: Iterable[tuple]
) -> Family:
    return Family(
        PREFIX + name, kind, help, labels, tuple((tuple(lv), float(v)) for lv, v in samples)
    )


def to_prometheus(families: Iterable[Family]) -> Iterator[Metric]:
    for family in families:
        cls = GaugeMetricFamily if family.kind == "gauge" else CounterMetricFamily
        metric = cls(family.name, family.help, labels=list(family.labels))
        for labels, value in family.samples:
            metric.add_metric(list(labels), value)
        yield metric


# -- the agent ------------------------------------------------------------------------------

ENCRYPTION_MODES = ("on", "prepare", "off")


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
        _labelled(
            "peer_sa_up",
            "gauge",
            "1 if an established IKE_SA with an installed CHILD_SA carries this peer",
            ("peer",),
            [((peer,), up) for peer, up in sorted(peer_up.items())],
        ),
        *_gauge(
            "peers_expected",
            "peers in the keyring (other nodes): one connection each",
            status.get("peers_expected", 0),
        ),
        *_gauge(
            "peers_up",
            "peers carried by an established IKE_SA with an installed CHILD_SA",
            status.get("peers_up", 0),
        ),
        *_gauge(
            "ike_sas", "IKE_SAs of the agent's connections, in any state", status.get("ike_sas", 0)
        ),
        *_gauge(
            "stale_ike_sas",
            "IKE_SAs authenticated before the sent generation changed, not yet reauthenticated",
            status.get("stale_ike_sas", 0),
        ),
        _labelled(
            "generation",
            "gauge",
            "1 for each key generation loaded, by role: sent (used to authenticate) or accepted",
            ("generation", "role"),
            [((g, role), 1) for g, role in sorted(generations.items())],
        ),
        *_gauge(
            "keyring_serial",
            "serial of the keyring loaded into charon",
            status.get("keyring_serial"),
        ),
        _labelled(
            "encryption_mode",
            "gauge",
            "1 for the mode of the cluster-wide switch this node is in: on, prepare (keys "
            "loaded and SAs up, nothing enforced yet), off",
            ("mode",),
            [((mode,), status.get("encryption") == mode) for mode in ENCRYPTION_MODES],
        ),
        *_gauge(
            "guard_installed",
            "1 while the guard that drops unprotected IPIP is installed (as last verified)",
            None if status.get("guard") is None else int(bool(status["guard"]["installed"])),
        ),
        *_gauge(
            "charon_connected",
            "1 while the agent's VICI session to charon is up",
            1 if status.get("charon_connected") else 0,
        ),
        *_gauge(
            "events_connected",
            "1 while the agent is subscribed to charon's events (rekeys, authentication failures)",
            1 if counts.events_connected else 0,
        ),
        _labelled(
            "ike_auth_failures_total",
            "counter",
            "IKE authentications that failed at this node: mismatch (the peer's AUTH did not "
            "verify with any key held), no_key (no key for the peer), rejected (the peer "
            "refused ours)",
            ("reason",),
            [((reason,), counts.auth_failures.get(reason, 0)) for reason in AUTH_REASONS],
        ),
        _labelled(
            "rekeys_total",
            "counter",
            "IKE_SA and CHILD_SA rekeyings at this node",
            ("sa",),
            [((sa,), counts.rekeys.get(sa, 0)) for sa in ("ike", "child")],
        ),
        _labelled(
            "reauth_requests_total",
            "counter",
            "reauthentications of stale IKE_SAs the agent asked charon for",
            (),
            [((), counts.reauth_requests)],
        ),
        _labelled(
            "reauths_completed_total",
            "counter",
            "of those, the ones whose old IKE_SA is gone with an established one in its place",
            (),
            [((), counts.reauths_completed)],
        ),
        _labelled(
            "vici_errors_total",
            "counter",
            "VICI requests charon refused or that failed, by command (connect: no session)",
            ("command",),
            [((command,), n) for command, n in sorted(counts.vici_errors.items())],
        ),
        *_gauge(
            "last_success_timestamp_seconds",
            "when the agent last finished a step with charon connected and no error",
            last_success,
        ),
    ]
    return families


def peer_sa_up(keyring: Keyring | None, node: str, sas: Iterable[IkeSa]) -> dict[str, bool]:
    """Per peer of `node` in the keyring: does an established IKE_SA with an installed
    CHILD_SA exist on its connection?"""
    from overlay_vici.agent.render import conn_name

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


class _Collector:
    def __init__(self, families: Callable[[], list[Family]]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from to_prometheus(self._families())


class AgentMetrics:
    """The agent's registry, fed by `observe` after every step (AgentConfig.on_step) and by
    `on_event` from the VICI event thread; `health` for /healthz."""

    def __init__(self, resync: float, clock: Callable[[], float] = time.time) -> None:
        self.resync = resync
        self.clock = clock
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_* (CPU, memory, open files)
        self.reconcile = Histogram(
            PREFIX + "reconcile_duration_seconds",
            "duration of the agent's reconcile passes (keyring, charon, SAs)",
            buckets=STEP_BUCKETS,
            registry=self.registry,
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
        self.registry.register(_Collector(self.families))

    def observe(self, agent: Agent, seconds: float) -> None:
        """After every step, in the agent's thread; never raises into the agent."""
        try:
            status = agent.status()
            sas = list(agent.sas)
            requested = []
            while agent.charon.reauth_requested:
                requested.append(agent.charon.reauth_requested.popleft())
            conns = agent.desired.target.messages.conns if agent.desired else {}
            peer_up = peer_sa_up(agent.applied, agent.config.node, sas)
            now = self.clock()
            with self._lock:
                self.reauths.observe(requested, sas, conns)
                self._status, self._peer_up = status, peer_up
                self.counts.vici_errors = dict(agent.charon.errors)
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


# -- the master -----------------------------------------------------------------------------


def master_families(
    leader: bool, decision: Decision | None, conflicts: Mapping[str, int]
) -> list[Family]:
    """The master's metrics: whether it leads, the API conflicts it met, and, while it leads,
    the mesh as its last decision left it (generation, rotation phase and timings, agents).
    Pure."""
    families = [
        *_gauge(
            "leader",
            "1 while this replica holds the leader Lease (only the leader writes)",
            1 if leader else 0,
        ),
        _labelled(
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
        *_gauge(
            "active_generation", "the key generation agents authenticate with (sent)", keyring.sent
        ),
        *_gauge("keyring_serial", "serial of the published keyring", keyring.serial),
        _labelled(
            "rotation_phase",
            "gauge",
            "1 for the rotation phase the mesh is in (idle: no rotation under way)",
            ("phase",),
            [((phase,), 1 if state.phase == phase else 0) for phase in PHASES],
        ),
        _labelled(
            "rotations_completed_total",
            "counter",
            "key rotations that reached their end (retire acknowledged)",
            (),
            [((), state.rotation - (1 if state.rotating else 0))],
        ),
        *_gauge(
            "rotation_phase_started_timestamp_seconds",
            "when the current rotation phase began",
            current.get(state.phase) if state.rotating else None,
        ),
        _labelled(
            "rotation_phase_duration_seconds",
            "gauge",
            "how long each phase of the last completed rotation took",
            ("phase",),
            [((phase,), seconds) for phase, seconds in durations],
        ),
        *_gauge(
            "last_rotation_timestamp_seconds",
            "when the last rotation ended (or the mesh began)",
            state.last_rotation,
        ),
        _labelled(
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
        *_gauge(
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
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_* (CPU, memory, open files)
        self.step_duration = Histogram(
            PREFIX + "master_step_duration_seconds",
            "duration of the master's passes (lead, read, decide, write)",
            buckets=STEP_BUCKETS,
            registry=self.registry,
        )
        self._lock = threading.Lock()
        self._leader = False
        self._decision: Decision | None = None
        self._conflicts: dict[str, int] = {}
        self._last_pass = clock()  # the loop starts now: healthy until it stalls
        self.registry.register(_Collector(self.families))

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


# -- HTTP -----------------------------------------------------------------------------------


def serve(
    port: int,
    registry: CollectorRegistry,
    health: Callable[[], tuple[bool, str]],
    address: str = "",
) -> ThreadingHTTPServer:
    """/metrics (Prometheus text format) and /healthz (200 or 503, one line) on `port`, in
    a daemon thread. OSError if the port cannot be bound."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:
            pass

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                body, code, kind = generate_latest(registry), 200, CONTENT_TYPE
            elif path == "/healthz":
                ok, reason = health()
                body, code = (reason + "\n").encode(), 200 if ok else 503
                kind = "text/plain; charset=utf-8"
            else:
                body, code, kind = b"not found: try /metrics or /healthz\n", 404, "text/plain"
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    class Server(ThreadingHTTPServer):
        daemon_threads = True

    server = Server((address, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server


def start(
    port: int, registry: CollectorRegistry, health: Callable[[], tuple[bool, str]], what: str
) -> ThreadingHTTPServer | None:
    """`serve`, logging where; a port that cannot be bound is logged, not fatal: the
    agent's and master's work does not depend on being watched."""
    if not port:
        return None
    try:
        server = serve(port, registry, health)
    except OSError as exc:
        log.error("metrics endpoint not started", port=port, error=str(exc.strerror or exc))
        return None
    log.info("metrics endpoint serving", component=what, port=server.server_address[1])
    return server
