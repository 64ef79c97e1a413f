"""Benchmark what the `overlay-vici agent` process adds by default: the metrics server and
the VICI event thread, against the same process with `--metrics-port 0`.

For every peer count N (this node plus N peers, two generations, keyrings built like
tests/keyring_fixtures.py, published with overlay_vici.core.files.publish_secret), against one
private charon started as bench/bench_reconcile.py starts it, this runs the real console
script (`.venv/bin/overlay-vici agent --node ... --keys ... --vici unix://... --status ...
--no-guard --resync 30`) --repeat times in each variant, alternating their order:

* default: `--metrics-port P` on a free port, so /metrics, /healthz and the event thread run;
* off: `--metrics-port 0`, neither (the lower bound).

Once the status file shows the keyring's serial applied, it waits --settle seconds (their
CPU is reported apart: at N=1000 the event thread is still reading the log events of the
start-up's loads), then reads over a --window of seconds (one resync step falls inside
it) the process's CPU (utime+stime of /proc/PID/stat, and each thread's schedstat), then
VmRSS/VmHWM and the thread count from /proc/PID/status; in the default variant it then
times --scrapes GETs of /metrics (one connection each) and notes the body's size and the
agent's CPU per scrape.

The node has the highest IP and charon already holds its connections when it starts (the
bench loads them first), as after an agent restart: the agent reloads every key and
connection once (its digests start empty) but initiates nothing. No peer exists, so charon
holds no IKE_SA and stays quiet; that keeps the window about the agent process alone.

    .venv/bin/python bench/bench_agent_process.py --peers 10,1000 --repeat 3 --window 30

With PYTHONPATH set to a snapshot of the code (e.g. from `git archive`), the bench and every
agent process run that snapshot, not a checkout others edit meanwhile; the report names it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from bench_reconcile import PrivateCharon, loadavg, log, lower_bound, machine

import overlay_vici
from overlay_vici.agent.render import Settings, swanctl_conf
from overlay_vici.agent.swanctl_conf import to_messages
from overlay_vici.core.files import publish_secret
from overlay_vici.core.keyring import Keyring, dumps

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from keyring_fixtures import build_keyring, node_name

VARIANTS = ("default", "off")  # --metrics-port P (a free port) / --metrics-port 0
RESYNC = 30
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Sample:
    """One agent process, measured once it applied the keyring."""

    start_wall: float  # s, spawn -> status file shows the serial
    start_cpu: float  # s of CPU until then
    settle_sched: float  # s of CPU (schedstat) from applied to the window, all threads
    settle_sched_main: float  # of which the main thread
    window_cpu: float  # s of CPU (utime+stime) over the steady window, all threads
    window_sched: float  # the same from the threads' schedstat (ns resolution)
    window_sched_main: float  # of which the main thread
    window_messages: int  # VICI requests the agent sent during the window
    rss_kb: int
    hwm_kb: int
    threads: int
    ike_sas: int  # in charon at the end of the window
    scrape_ms: float | None = None  # median of this process's GETs of /metrics
    scrape_bytes: int | None = None
    scrape_samples: int | None = None  # lines of /metrics that are not comments
    scrape_cpu_ms: float | None = None  # the agent's CPU per GET
    rss_after_scrapes_kb: int | None = None
    healthz: str | None = None
    error_lines: int = 0  # agent log lines at level error
    exit_code: int | None = None


# ---------------------------------------------------------------------------- /proc


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process, all its threads (ended ones too), in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK  # fields 14 and 15 of stat(5)


def thread_cpu(pid: int) -> dict[int, float]:
    """Seconds on CPU per thread, from schedstat (nanoseconds, unlike stat's ticks)."""
    seconds = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with suppress(OSError):  # a thread that ended meanwhile
            seconds[int(task.name)] = int((task / "schedstat").read_text().split()[0]) / 1e9
    return seconds


def proc_status(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            values[key] = int(value.split()[0])
    return values


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def read_status(path: Path) -> dict[str, object]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not written yet, or replaced under us
        return {}


def get(port: int, path: str) -> tuple[int, bytes, float]:
    """One GET on a fresh connection: status, body, seconds from connect to last byte."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    return response.status, body, time.perf_counter() - started


def ike_sa_count(charon: PrivateCharon) -> int:
    with charon.session() as session:
        events = session.streamed_request("list-sas", "list-sa", {"noblock": "yes"})
        return sum(len(event) for event in events)


# ------------------------------------------------------------------------------ runs


@dataclass(frozen=True)
class Setup:
    agent: str
    charon: PrivateCharon
    workdir: Path
    window: float
    settle: float
    scrapes: int


def run_agent(setup: Setup, peers: int, keyring: Keyring, keys: Path, variant: str) -> Sample:
    node = node_name(peers)  # the highest index: the highest IP
    tag = f"{peers}-{variant}-{time.monotonic_ns()}"
    status = setup.workdir / f"status-{tag}.json"
    port = free_port() if variant == "default" else 0
    command = [
        setup.agent,
        "agent",
        "--node",
        node,
        "--keys",
        str(keys),
        "--vici",
        setup.charon.uri,
        "--status",
        str(status),
        "--no-guard",
        "--resync",
        str(RESYNC),
        "--metrics-port",
        str(port),
        "--node-key",
        str(setup.workdir / "node.key"),
    ]
    log_path = setup.workdir / f"agent-{tag}.log"
    with log_path.open("wb") as log_file:
        started = time.monotonic()
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    pid = process.pid
    try:
        deadline = started + 180
        while read_status(status).get("keyring_serial") != keyring.serial:
            if process.poll() is not None:
                raise RuntimeError(f"agent exited ({process.returncode}); see {log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"agent did not apply the keyring in 180 s; see {log_path}")
            time.sleep(0.02)
        start_wall = time.monotonic() - started
        start_cpu, threads_applied = cpu_seconds(pid), thread_cpu(pid)
        time.sleep(setup.settle)

        messages_before = int(read_status(status).get("vici_messages") or 0)
        cpu_before, threads_before = cpu_seconds(pid), thread_cpu(pid)
        time.sleep(setup.window)
        cpu_after, threads_after = cpu_seconds(pid), thread_cpu(pid)
        if threads_after.keys() != threads_before.keys():
            raise RuntimeError("the agent's threads changed during the steady window")
        sched = {tid: threads_after[tid] - threads_before[tid] for tid in threads_after}
        settled = {t: threads_before[t] - threads_applied.get(t, 0.0) for t in threads_before}
        memory = proc_status(pid)
        messages_after = int(read_status(status).get("vici_messages") or 0)
        sample = Sample(
            start_wall=start_wall,
            start_cpu=start_cpu,
            settle_sched=sum(settled.values()),
            settle_sched_main=settled[pid],
            window_cpu=cpu_after - cpu_before,
            window_sched=sum(sched.values()),
            window_sched_main=sched[pid],
            window_messages=messages_after - messages_before,
            rss_kb=memory["VmRSS"],
            hwm_kb=memory["VmHWM"],
            threads=memory["Threads"],
            ike_sas=ike_sa_count(setup.charon),
        )
        if port:
            scrape(setup, sample, pid, port)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # the agent's own stop
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    sample.exit_code = process.returncode
    for line in log_path.read_text(errors="replace").splitlines():
        with_level = line.startswith("{") and json.loads(line).get("level") == "error"
        sample.error_lines += with_level or "Traceback" in line
    return sample


def scrape(setup: Setup, sample: Sample, pid: int, port: int) -> None:
    code, body, _ = get(port, "/healthz")
    sample.healthz = f"{code} {body.decode().strip()}"
    cpu_before = cpu_seconds(pid)
    seconds, sizes = [], set()
    for _ in range(setup.scrapes):
        code, body, elapsed = get(port, "/metrics")
        if code != 200:
            raise RuntimeError(f"GET /metrics answered {code}")
        seconds.append(elapsed)
        sizes.add(len(body))
    sample.scrape_cpu_ms = (cpu_seconds(pid) - cpu_before) * 1e3 / setup.scrapes
    sample.scrape_ms = statistics.median(seconds) * 1e3
    sample.scrape_bytes = max(sizes)
    text = body.decode()
    sample.scrape_samples = sum(1 for line in text.splitlines() if line and line[0] != "#")
    sample.rss_after_scrapes_kb = proc_status(pid)["VmRSS"]


def run_peers(setup: Setup, peers: int, repeat: int) -> dict[str, list[Sample]]:
    """Load charon with what the agent will load, then the variants, alternating."""
    keyring = build_keyring(peers + 1)  # node-0 .. node-N; node-N has the highest IP
    keys = setup.workdir / f"keys-{peers}"
    publish_secret(keys, {"keyring.json": dumps(keyring)})
    setup.charon.empty()
    messages = to_messages(swanctl_conf(keyring, node_name(peers), Settings()))
    lower_bound(setup.charon, messages)
    mark = setup.charon.log_mark()
    samples: dict[str, list[Sample]] = {variant: [] for variant in VARIANTS}
    for run in range(repeat):
        order = VARIANTS if run % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            log(f"N={peers}: run {run + 1}/{repeat}, {variant}")
            samples[variant].append(run_agent(setup, peers, keyring, keys, variant))
            loaded = setup.charon.loaded()
            if loaded != (peers, 2 * peers):
                raise RuntimeError(f"charon holds {loaded} conns/keys, expected N, 2N")
    problems = setup.charon.problems(mark)
    if problems:
        raise RuntimeError("charon logged failures:\n" + "\n".join(problems[:5]))
    return samples


# ---------------------------------------------------------------------------- report


def stat(values: list[float], digits: int = 1) -> str:
    """median (min), or one value."""
    if len(values) == 1:
        return f"{values[0]:,.{digits}f}"
    return f"{statistics.median(values):,.{digits}f} ({min(values):,.{digits}f})"


def every(values: list[object]) -> str:
    return str(values[0]) if len(set(values)) == 1 else ", ".join(map(str, values))


def table(
    results: dict[int, dict[str, list[Sample]]], window: float, settle: float, scrapes: int
) -> str:
    columns = [(n, v) for n in results for v in VARIANTS]
    names = {"default": "default (metrics on)", "off": "`--metrics-port 0`"}
    lines = [
        "| measure | " + " | ".join(f"N={n:,} {names[v]}" for n, v in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]

    def row(name: str, cell: Callable[[list[Sample]], str], metrics_only: bool = False) -> None:
        cells = ["-" if metrics_only and v == "off" else cell(results[n][v]) for n, v in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    def diff(name: str, value: Callable[[Sample], float], digits: int = 1) -> None:
        cells = []
        for n, v in columns:
            if v == "off":
                cells.append("")
                continue
            on, off = (statistics.median(value(s) for s in results[n][k]) for k in VARIANTS)
            cells.append(f"{on - off:+,.{digits}f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    row(
        "start -> keyring applied (status file), wall s",
        lambda s: stat([x.start_wall for x in s], 2),
    )
    row("start -> keyring applied, CPU s", lambda s: stat([x.start_cpu for x in s], 2))
    row(
        f"applied -> window ({settle:.0f} s settle), CPU (schedstat), ms",
        lambda s: stat([x.settle_sched * 1e3 for x in s], 1),
    )
    row(
        "&nbsp;&nbsp;of which threads other than main, ms",
        lambda s: stat([(x.settle_sched - x.settle_sched_main) * 1e3 for x in s], 1),
    )
    row(
        f"**CPU over the {window:.0f} s steady window** (utime+stime), ms",
        lambda s: stat([x.window_cpu * 1e3 for x in s], 0),
    )
    row(
        "&nbsp;&nbsp;as % of one core",
        lambda s: stat([x.window_cpu / window * 100 for x in s], 2),
    )
    row(
        "&nbsp;&nbsp;the same from the threads' schedstat (ns resolution), ms",
        lambda s: stat([x.window_sched * 1e3 for x in s], 1),
    )
    row(
        "&nbsp;&nbsp;&nbsp;&nbsp;of which threads other than main (schedstat), ms",
        lambda s: stat([(x.window_sched - x.window_sched_main) * 1e3 for x in s], 1),
    )
    diff(
        "CPU in the window (schedstat), default - off (medians), ms",
        lambda x: x.window_sched * 1e3,
    )
    row("VICI requests in the window (every run)", lambda s: every([x.window_messages for x in s]))
    row("**VmRSS** at the window's end, MiB", lambda s: stat([x.rss_kb / 1024 for x in s]))
    row("VmHWM, MiB", lambda s: stat([x.hwm_kb / 1024 for x in s]))
    diff("VmRSS, default - off (medians), MiB", lambda x: x.rss_kb / 1024)
    row("**threads** (every run)", lambda s: every([x.threads for x in s]))
    row(
        f"**GET /metrics**, ms (per run: median of {scrapes})",
        lambda s: stat([x.scrape_ms or 0.0 for x in s], 2),
        metrics_only=True,
    )
    row(
        "/metrics body, bytes",
        lambda s: stat([float(x.scrape_bytes or 0) for x in s], 0),
        metrics_only=True,
    )
    row(
        "/metrics samples (non-comment lines, every run)",
        lambda s: every([f"{x.scrape_samples:,}" for x in s]),
        metrics_only=True,
    )
    row(
        "agent CPU per GET /metrics, ms",
        lambda s: stat([x.scrape_cpu_ms or 0.0 for x in s], 1),
        metrics_only=True,
    )
    row(
        f"VmRSS after the {scrapes} GETs, MiB",
        lambda s: stat([(x.rss_after_scrapes_kb or 0) / 1024 for x in s]),
        metrics_only=True,
    )
    row("/healthz (every run)", lambda s: every([x.healthz for x in s]), metrics_only=True)
    row("IKE_SAs in charon (every run)", lambda s: every([x.ike_sas for x in s]))
    row(
        "agent log errors / exit code on SIGTERM (every run)",
        lambda s: every([f"{x.error_lines} / {x.exit_code}" for x in s]),
    )
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--peers", default="10,1000", help="comma-separated N (default %(default)s)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant and N (default 3)")
    parser.add_argument("--window", type=float, default=30.0, help="steady window, s (default 30)")
    parser.add_argument(
        "--settle",
        type=float,
        default=15.0,
        help="wait after applied before the window, s (default 15: at N=1000 the event "
        "thread drains the start-up's log events for about 12 s)",
    )
    parser.add_argument("--scrapes", type=int, default=20, help="GETs of /metrics (default 20)")
    parser.add_argument(
        "--agent",
        default=str(Path(sys.executable).with_name("overlay-vici")),
        help="the console script (default: overlay-vici beside this Python)",
    )
    parser.add_argument("--charon", default="/usr/lib/ipsec/charon", help="charon binary")
    parser.add_argument(
        "--no-isolate",
        action="store_true",
        help="start charon plainly, not in private mount+network namespaces",
    )
    parser.add_argument("--out", type=Path, metavar="FILE", help="also write the report here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    try:
        args.peer_counts = [int(p) for p in args.peers.split(",") if p.strip()]
    except ValueError:
        parser.error(f"--peers {args.peers!r} must be comma-separated integers")
    if not args.peer_counts or min(args.peer_counts) < 1 or args.repeat < 1 or args.scrapes < 1:
        parser.error("--peers, --repeat and --scrapes must be positive")
    if args.window <= 0 or args.settle < 0:
        parser.error("--window must be positive and --settle not negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    isolate = not args.no_isolate and os.geteuid() == 0 and shutil.which("unshare") is not None
    workdir = Path(tempfile.mkdtemp(prefix="overlay-vici-bench-process."))
    charon = PrivateCharon(workdir, args.charon, isolate)
    setup = Setup(args.agent, charon, workdir, args.window, args.settle, args.scrapes)
    started, load_before = time.perf_counter(), loadavg()
    try:
        charon.start()
        log(f"charon up ({'private namespaces' if isolate else 'host namespaces'}), {workdir}")
        results = {n: run_peers(setup, n, args.repeat) for n in args.peer_counts}
        info = machine(charon)
    except BaseException:
        log(f"charon log tail:\n{charon.tail()}")
        raise
    finally:
        charon.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    # PYTHONPATH may point the bench and the agent processes at a snapshot of the code.
    path = f"PYTHONPATH={os.environ['PYTHONPATH']} " if os.environ.get("PYTHONPATH") else ""
    command = path + " ".join([os.path.relpath(sys.executable), *sys.argv])
    agent = (
        f"{os.path.relpath(args.agent)} agent --node node-N --keys DIR --vici unix://... "
        f"--status FILE --no-guard --resync {RESYNC} --metrics-port PORT|0"
    )
    report = "\n".join(
        [
            f"Command: `{command}`  ",
            f"Agent process: `{agent}`  ",
            f"Code: overlay_vici from {Path(overlay_vici.__file__).parent}  ",
            f"Machine: {info}  ",
            f"charon in {'private mount+net namespaces' if isolate else 'host namespaces'}; "
            f"median (min) over {args.repeat} processes per cell; whole run "
            f"{time.perf_counter() - started:.0f} s; load average (1 min) {load_before} "
            f"before, {loadavg()} after.",
            "",
            table(results, args.window, args.settle, args.scrapes),
        ]
    )
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
