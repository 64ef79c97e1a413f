"""Prometheus metrics and /healthz: what the agent's and the master's metrics share.

Each wing maps its own state to metric values, purely (overlay_vici.agent.metrics,
overlay_vici.master.metrics), as `Family` values; `to_prometheus` and `Collector` turn those
into a registry's families, and `serve` is the small HTTP server that also answers /healthz.
Every metric is documented in docs/operations.md ("Monitoring").
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from overlay_vici.core import log

PREFIX = "overlay_vici_"
# The classic text format, which every Prometheus reads (our names need no escaping, so the
# body is the same in its successor, 1.0.0).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
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


def gauge(name: str, help: str, value: float | None) -> list[Family]:
    return [] if value is None else [Family(PREFIX + name, "gauge", help, (), (((), value),))]


def labelled(
    name: str, kind: str, help: str, labels: tuple[str, ...], samples: Iterable[tuple]
) -> Family:
    return Family(
        PREFIX + name, kind, help, labels, tuple((tuple(lv), float(v)) for lv, v in samples)
    )


def registry_with_steps(name: str, help: str) -> tuple[CollectorRegistry, Histogram]:
    """A process's registry: process_* (CPU, memory, open files) and the histogram of its
    loop's passes, `name`."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    steps = Histogram(PREFIX + name, help, buckets=STEP_BUCKETS, registry=registry)
    return registry, steps


def to_prometheus(families: Iterable[Family]) -> Iterator[Metric]:
    for family in families:
        cls = GaugeMetricFamily if family.kind == "gauge" else CounterMetricFamily
        metric = cls(family.name, family.help, labels=list(family.labels))
        for labels, value in family.samples:
            metric.add_metric(list(labels), value)
        yield metric


class Collector:
    """Serves a pure function's families as a Prometheus collector."""

    def __init__(self, families: Callable[[], list[Family]]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from to_prometheus(self._families())


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
