"""What the command line's wings share: durations, and the options every process takes.

Each wing (overlay_vici.agent.cli, .master.cli, .reporter.cli) registers its own
subcommands; an option more than one wing takes is declared here, once.
"""

from __future__ import annotations

import argparse
import re
import signal
import threading

from overlay_vici.core.contract import in_cluster_namespace

_DURATION_PARTS = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def seconds(duration: str) -> float:
    """Seconds from `90`, `90s`, `15m`, `24h` or `7d`; ValueError for anything else."""
    match = _DURATION_PARTS.match(duration.strip())
    if not match:
        raise ValueError(f"{duration!r} is not a duration like 90s, 15m, 24h or 7d")
    return float(match[1]) * _UNITS[match[2]]


def duration(text: str) -> float:
    """Seconds from `90`, `90s`, `15m`, `24h` or `7d` (`seconds`), and more than 0."""
    try:
        value = seconds(text)
    except ValueError:
        value = 0.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 15m, 24h or 7d")
    return value


def add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])


def add_metrics_port(parser: argparse.ArgumentParser, port: int) -> None:
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=port,
        metavar="PORT",
        help="serve Prometheus /metrics and /healthz on this TCP port, 0 = off "
        "(default %(default)s)",
    )


def namespace_of(args: argparse.Namespace) -> str:
    """--namespace, else the pod's own, else `default`."""
    return args.namespace or in_cluster_namespace() or "default"


def stop_event() -> threading.Event:
    """Set on SIGTERM or SIGINT: the long-running commands end their loop on it."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop
