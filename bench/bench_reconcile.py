"""Benchmark the agent's reconcile against one fresh, private strongSwan charon.

For every peer count N (node n0 plus N peers, a keyring of two generations, so 2 keys and
1 connection per peer) and all in one run against one charon, this measures side by side:

1. the agent's full reconcile: Agent.step() into an empty charon, its VICI messages by
   command, and how the time splits (read keyring bytes, validate, render = jinja2 + HKDF,
   parse, digests, plan, send by command, charon queries), by wrapping the very functions
   the agent calls;
2. the lower bound: the same load-shared/load-conn messages sent in a plain loop over one
   vici.Session into an emptied charon;
3. `swanctl --load-all --file` of the same rendered swanctl.conf into an emptied charon
   (2 and 3 run just before each run of 1, so that drifting host load hits all three);
4. steady state: a step with nothing changed (--steady-repeat of them), and a step after
   one peer was added (--repeat of them);
5. resident memory of a process that ran the full reconcile, against a process that only
   imported the same modules (both in subprocesses, so this process does not pollute them).

The node with the lowest IP of a pair also sends one asynchronous `initiate` (timeout -1)
per newly loaded connection. So that 1-4 compare like with like (swanctl and the plain
loop only load), n0 has the *highest* IP there and sends loads only. The same full
reconcile, steady and one-peer-change steps are then measured again with n0 at the
*lowest* IP, so that it initiates to every peer; `initiate` messages are counted and timed
apart from the load-* ones. No peer exists, so every IKE_SA stays CONNECTING and charon
retransmits into a network namespace without routes; the run reports that, and every
measurement starts from a charon whose IKE_SAs were all terminated.

charon runs in private mount and network namespaces when run as root (its pid file is
hard-coded to /var/run/charon.pid, and its trap policies then stay out of the host's XFRM
tables); --no-isolate starts it plainly (do not: the initiations would then leave the host).

    .venv/bin/python bench/bench_reconcile.py --peers 10,1000 --repeat 3 --out results.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any
from unittest import mock

import vici
from vici.exception import CommandException

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from charon_process import CharonProcess

from overlay_vici.agent import agent as agent_module
from overlay_vici.agent import conf_parts as conf_parts_module
from overlay_vici.agent import render as render_module
from overlay_vici.agent.agent import Agent, AgentConfig
from overlay_vici.agent.charon import Charon
from overlay_vici.agent.conf_parts import ConfParts
from overlay_vici.agent.render import Settings
from overlay_vici.agent.swanctl_conf import Messages, to_messages
from overlay_vici.core.files import publish_secret
from overlay_vici.core.keyring import Generation, Keyring, Peer, dumps, new_generation_key

NODE = "n0"
PEER_BASE = IPv4Address("10.0.0.1")  # peer n<i> has PEER_BASE + i, for i = 1 .. N (+ added)
SETTINGS = Settings()
# The functions whose time the split reports, by the module that looks them up: the agent,
# and conf_parts (each peer's part rendered, parsed and digested when its key is new).
AGENT_FUNCTIONS = {
    "read_keyring_bytes": "read keyring",
    "loads": "validate",
    "plan": "plan",
}
CONF_FUNCTIONS = {"parts": "render", "to_messages": "parse", "digest": "digests"}
# Charon methods the agent queries with, and the label of each.
CHARON_QUERIES = {
    "loaded_conns": "queries",
    "loaded_shared": "queries",
    "ike_sa_count": "queries",
    "ike_sas": "list-sas",
}
QUERY_COMMANDS = ("get-conns", "get-shared", "stats", "list-sas")  # timed by those wrappers
SPLIT_ORDER = (
    "read keyring",
    "validate",
    "render",
    "hkdf",
    "parse",
    "digests",
    "plan",
    "send load-*",
    "send initiate",
    "send other",
    "queries",
    "list-sas",
    "other",
)
# What charon logs when an IKE_SA_INIT meets a namespace without routes: expected here.
UNREACHABLE = "error writing to socket: Network is unreachable"


@dataclass(frozen=True)
class Role:
    name: str
    node_ip: IPv4Address


# n0 above every peer: it only loads. n0 below every peer: it also initiates to each.
LOAD_ONLY = Role("highest IP", IPv4Address("10.255.255.254"))
INITIATOR = Role("lowest IP", PEER_BASE)

# Runs in a fresh interpreter: import what the agent imports, optionally run one full
# reconcile, then report this process's resident memory in kB.
MEMORY_CHILD = r"""
import json, sys
from pathlib import Path

import overlay_vici.agent.agent, overlay_vici.agent.charon, overlay_vici.agent.plan
import overlay_vici.agent.render, overlay_vici.agent.sa_plan, overlay_vici.agent.swanctl_conf
import overlay_vici.core.files, overlay_vici.core.keyring
from overlay_vici.agent.agent import Agent, AgentConfig
from overlay_vici.agent.charon import Charon
from overlay_vici.agent.conf_parts import ConfParts
from overlay_vici.agent.render import Settings

mode = sys.argv[1]
messages = 0
if mode == "agent":
    node, keys, uri = sys.argv[2:5]
    agent = Agent(AgentConfig(node=node, secret_dir=Path(keys), settings=Settings()), Charon(uri))
    agent.step()
    if agent.last_error:
        sys.exit(f"agent step failed: {agent.last_error}")
    messages = agent.charon.messages
status = {}
for line in Path("/proc/self/status").read_text().splitlines():
    key, _, value = line.partition(":")
    if key in ("VmRSS", "VmHWM"):
        status[key] = int(value.split()[0])
status["messages"] = messages
print(json.dumps(status))
"""


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- charon


# What `overlay-vici render strongswan` prints, plus random IKE ports so that this charon
# does not collide with one already bound to 500/4500.
RANDOM_PORTS = "charon {\n  port = 0\n  port_nat_t = 0\n}\n"


class PrivateCharon(CharonProcess):
    """One charon started for this run (tests/charon_process.py), and what the benchmark
    asks of it besides."""

    def version(self) -> str:
        with self.session() as session:
            info = session.request("version")
        return " ".join(info[k].decode() for k in ("daemon", "version", "sysname", "release"))

    def empty(self) -> int:
        """Drop every IKE_SA, then unload every connection and shared key, so that the next
        load starts from zero and no retransmission runs meanwhile. Returns the IKE_SAs
        dropped."""
        with self.session() as session:
            dropped = 0
            deadline = time.monotonic() + 60
            while ids := self._ike_sa_ids(session):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"charon still holds {len(ids)} IKE_SAs after 60 s")
                for ike_id in ids:
                    # force: no DELETE to a peer that never answered; -1: do not wait.
                    with suppress(CommandException):  # it went away meanwhile
                        session.request(
                            "terminate", {"ike-id": ike_id, "force": "yes", "timeout": "-1"}
                        )
                dropped += len(ids)
                time.sleep(0.05)
            for name in session.request("get-conns").get("conns", []):
                session.request("unload-conn", {"name": name})
            for key_id in session.request("get-shared").get("keys", []):
                session.request("unload-shared", {"id": key_id})
            left = len(session.request("get-conns").get("conns", [])) + len(
                session.request("get-shared").get("keys", [])
            )
        if left:
            raise RuntimeError(f"charon still holds {left} connections/keys after unloading")
        return dropped

    @staticmethod
    def _ike_sa_ids(session: vici.Session) -> list[str]:
        events = session.streamed_request("list-sas", "list-sa", {"noblock": "yes"})
        return [sa["uniqueid"].decode() for event in events for sa in event.values()]

    def loaded(self) -> tuple[int, int]:
        with self.session() as session:
            conns = len(session.request("get-conns").get("conns", []))
            keys = len(session.request("get-shared").get("keys", []))
        return conns, keys

    def tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def log_mark(self) -> int:
        """Where the log ends now: problems(since=mark) then sees only what follows."""
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def problems(self, since: int = 0) -> list[str]:
        """Log lines that say something failed, but not the start-up chatter."""
        if not self.log_path.exists():
            return []
        with self.log_path.open("rb") as handle:
            handle.seek(since)
            data = handle.read()
        pattern = re.compile(r"unable|failed|error|refus", re.IGNORECASE)
        return [
            line
            for line in data.decode(errors="replace").splitlines()
            if pattern.search(line) and " 00[" not in line
        ]


# --------------------------------------------------------------------------- keyring


def make_keyring(peers: int, role: Role) -> Keyring:
    """n0 at the role's IP and n1..nN at PEER_BASE + i; generation 2 is sent, 1 accepted."""
    nodes = (
        Peer(NODE, str(role.node_ip)),
        *(Peer(f"n{i}", str(PEER_BASE + i)) for i in range(1, peers + 1)),
    )
    generations = (Generation(1, new_generation_key()), Generation(2, new_generation_key()))
    return Keyring(serial=1, sent=2, generations=generations, peers=nodes)


def with_one_more_peer(keyring: Keyring) -> Keyring:
    """The next peer's IP is above every other peer's and still below the load-only n0."""
    index = len(keyring.peers)
    peer = Peer(f"n{index}", str(PEER_BASE + index))
    return replace(keyring, serial=keyring.serial + 1, peers=(*keyring.peers, peer))


def publish(keys: Path, keyring: Keyring) -> None:
    publish_secret(keys, {"keyring.json": dumps(keyring)})


# ------------------------------------------------------------------ instrumentation


@dataclass
class Split:
    """Seconds and calls per label, from wrappers around the functions the agent calls."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    results: dict[str, Any] = field(default_factory=dict)
    sent: Counter[str] = field(default_factory=Counter)  # VICI command -> requests

    def record(self, label: str, function: Callable[..., Any]) -> Callable[..., Any]:
        """Remember `function`'s last result under `label`, untimed."""

        def recorded(*args: Any, **kwargs: Any) -> Any:
            self.results[label] = function(*args, **kwargs)
            return self.results[label]

        return recorded

    def wrap(self, label: str, function: Callable[..., Any]) -> Callable[..., Any]:
        """Time `function` under `label`; remember its last result under `label`."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                result = function(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - started
                self.calls[label] += 1
            self.results[label] = result
            return result

        return timed

    def wrap_vici(self, function: Callable[..., Any]) -> Callable[..., Any]:
        """Charon._call: count every VICI command the agent sends, on
        whichever path; time the commands that no query wrapper already times."""

        def counted(command: str, *args: Any, **kwargs: Any) -> Any:
            self.sent[command] += 1
            if command in QUERY_COMMANDS:
                return function(command, *args, **kwargs)
            label = "send load-*" if command.startswith("load-") else f"send {command}"
            if label not in SPLIT_ORDER:
                label = "send other"
            started = time.perf_counter()
            try:
                return function(command, *args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - started

        return counted


@contextmanager
def instrumented(agent: Agent) -> Iterator[Split]:
    split = Split()
    with ExitStack() as stack:
        for name, label in AGENT_FUNCTIONS.items():
            wrapped = split.wrap(label, getattr(agent_module, name))
            stack.enter_context(mock.patch.object(agent_module, name, wrapped))
        for name, label in CONF_FUNCTIONS.items():
            wrapped = split.wrap(label, getattr(conf_parts_module, name))
            stack.enter_context(mock.patch.object(conf_parts_module, name, wrapped))
        wrapped = split.wrap("render", render_module.Part.render)
        stack.enter_context(mock.patch.object(render_module.Part, "render", wrapped))
        wrapped = split.record("conf", ConfParts.build)
        stack.enter_context(mock.patch.object(ConfParts, "build", wrapped))
        wrapped = split.wrap("hkdf", render_module.psk_for)
        stack.enter_context(mock.patch.object(render_module, "psk_for", wrapped))
        wrapped = split.wrap_vici(agent.charon._call)
        stack.enter_context(mock.patch.object(agent.charon, "_call", wrapped))
        for name, label in CHARON_QUERIES.items():
            wrapped = split.wrap(label, getattr(agent.charon, name))
            stack.enter_context(mock.patch.object(agent.charon, name, wrapped))
        yield split


@dataclass
class StepSample:
    seconds: float
    messages: int  # every VICI request of the step, queries included
    sent: Counter[str]  # every VICI request of the step, per command
    split: dict[str, float]
    text: str | None  # the rendered swanctl.conf, if the step rendered
    sessions: int  # VICI sessions opened: each new one clears the agent's sent digests
    sas: int  # IKE_SAs the step's list-sas returned

    @property
    def loads(self) -> int:
        return sum(n for command, n in self.sent.items() if command.startswith("load-"))

    @property
    def initiates(self) -> int:
        return self.sent["initiate"]


def timed_step(agent: Agent) -> StepSample:
    before, sessions = agent.charon.messages, agent.charon.sessions
    with instrumented(agent) as split:
        started = time.perf_counter()
        agent.step()
        seconds = time.perf_counter() - started
    if agent.last_error:
        raise RuntimeError(f"agent step failed: {agent.last_error}")
    messages = agent.charon.messages - before
    if sum(split.sent.values()) != messages:
        raise RuntimeError(f"counted {split.sent} but charon.messages moved by {messages}")
    pieces = dict(split.seconds)
    # HKDF runs inside render; "other" is what no wrapper saw (Agent._send's bookkeeping,
    # _initiated, _mark_applied, plan_sas, logging ...).
    pieces["other"] = seconds - sum(v for k, v in pieces.items() if k != "hkdf")
    return StepSample(
        seconds,
        messages,
        split.sent,
        pieces,
        split.results["conf"].text if "conf" in split.results else None,
        agent.charon.sessions - sessions,
        len(agent.upkeep.sas),
    )


def steps(agent: Agent, count: int, prepare: Callable[[], None]) -> list[StepSample]:
    samples = []
    for _ in range(count):
        prepare()
        samples.append(timed_step(agent))
    return samples


def drained(agent: Agent) -> list[StepSample]:
    """Steps until one initiates nothing (that one included), as the agent's loop runs
    them: at once while initiations are due."""
    samples = [timed_step(agent)]
    while samples[-1].initiates:
        samples.append(timed_step(agent))
    return samples


def new_agent(keys: Path, charon: PrivateCharon) -> Agent:
    config = AgentConfig(node=NODE, secret_dir=keys, settings=SETTINGS)
    return Agent(config, Charon(charon.uri))


# -------------------------------------------------------------------------- phases


@dataclass
class Phases:
    """One role's agent steps at one N, and what charon logged as failed meanwhile."""

    full: list[StepSample] = field(default_factory=list)
    steady: list[StepSample] = field(default_factory=list)
    change: list[StepSample] = field(default_factory=list)
    # The steps after each full reconcile until one initiates nothing (sa_plan.INITIATE_BATCH
    # a step): every peer initiated by then.
    drain: list[list[StepSample]] = field(default_factory=list)
    dropped: int = 0  # IKE_SAs terminated after the role's last step
    problems: list[str] = field(default_factory=list)  # charon failure lines meanwhile


@dataclass
class Result:
    peers: int
    agent: Phases = field(default_factory=Phases)  # n0 at the highest IP: loads only
    initiator: Phases | None = None  # n0 at the lowest IP: loads + initiates
    lower: list[float] = field(default_factory=list)
    lower_messages: int = 0
    swanctl: list[float] = field(default_factory=list)
    swanctl_empty: list[float] = field(default_factory=list)
    swanctl_loaded: str = ""
    problems: list[str] = field(default_factory=list)  # charon failure lines, n0 highest IP
    memory_base: dict[str, int] = field(default_factory=dict)
    memory_agent: dict[str, int] = field(default_factory=dict)
    conf_bytes: int = 0


def lower_bound(charon: PrivateCharon, messages: Messages) -> tuple[float, int]:
    """The same bodies, keys first as the planner orders them, over one plain session."""
    bodies = [("load-shared", m) for m in messages.shared.values()]
    bodies += [("load-conn", m) for m in messages.conns.values()]
    with charon.session() as session:
        started = time.perf_counter()
        for command, message in bodies:
            session.request(command, message)
        seconds = time.perf_counter() - started
    return seconds, len(bodies)


def swanctl_load(swanctl: str, charon: PrivateCharon, conf: Path) -> tuple[float, str]:
    command = [swanctl, "--load-all", "--file", str(conf), "--uri", charon.uri]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr}")
    lines = done.stdout.splitlines()
    secrets = sum(line.startswith("loaded ike secret") for line in lines)
    conns = [line for line in lines if line.startswith("successfully loaded")]
    return seconds, "; ".join([f"loaded {secrets} ike secrets", *conns])


def memory(mode: str, *args: str) -> dict[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, mode, *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"memory child ({mode}) failed: {done.stderr}")
    return json.loads(done.stdout)


def agent_phases(
    role: Role,
    keyring: Keyring,
    repeat: int,
    steady_repeat: int,
    workdir: Path,
    charon: PrivateCharon,
    before_full: Callable[[], None] = lambda: None,
) -> tuple[Phases, Messages]:
    """Full reconciles into an emptied charon (`before_full` runs ahead of each, so that
    what it measures interleaves with them), then steady steps, then one-peer changes.

    Returns also the messages the full reconciles parsed from their rendered file."""
    phases = Phases()
    peers = len(keyring.peers) - 1
    keys = workdir / f"keys-{peers}-{role.node_ip}"
    publish(keys, keyring)

    log(f"N={peers}, n0 {role.name}: full reconcile x{repeat}")
    agent = None
    for _ in range(repeat):
        before_full()
        charon.empty()
        agent = new_agent(keys, charon)
        phases.full.append(timed_step(agent))
        phases.drain.append(drained(agent))
    assert agent is not None and agent.desired is not None
    messages = agent.desired.target.messages
    loaded = charon.loaded()
    if loaded != (peers, 2 * peers):
        raise RuntimeError(f"after the agent's step charon holds {loaded}, expected N, 2N")

    log(f"N={peers}, n0 {role.name}: steady steps x{steady_repeat}")
    phases.steady = steps(agent, steady_repeat, lambda: None)

    log(f"N={peers}, n0 {role.name}: one-peer changes x{repeat}")
    changed = [keyring]

    def add_peer() -> None:
        changed.append(with_one_more_peer(changed[-1]))
        publish(keys, changed[-1])

    phases.change = steps(agent, repeat, add_peer)
    agent.charon.close()
    phases.dropped = charon.empty()
    return phases, messages


def run_peers(
    peers: int,
    repeat: int,
    steady_repeat: int,
    workdir: Path,
    charon: PrivateCharon,
    swanctl: str,
    initiator: bool,
) -> Result:
    result = Result(peers)
    mark = charon.log_mark()
    keyring = make_keyring(peers, LOAD_ONLY)
    # What the agent will render and parse (checked below): the lower bound sends these
    # bodies and swanctl loads this file, each run just before one full reconcile.
    text = render_module.swanctl_conf(keyring, NODE, SETTINGS)
    messages = to_messages(text)
    conf = workdir / f"swanctl-{peers}.conf"
    conf.write_text(text)
    result.conf_bytes = len(text.encode())
    empty = workdir / "swanctl-empty.conf"
    empty.write_text("connections {\n}\nsecrets {\n}\n")

    def compare() -> None:
        log(f"N={peers}: lower bound, swanctl --load-all, swanctl of an empty file")
        charon.empty()
        seconds, result.lower_messages = lower_bound(charon, messages)
        result.lower.append(seconds)
        charon.empty()
        seconds, result.swanctl_loaded = swanctl_load(swanctl, charon, conf)
        result.swanctl.append(seconds)
        charon.empty()
        result.swanctl_empty.append(swanctl_load(swanctl, charon, empty)[0])

    result.agent, parsed = agent_phases(
        LOAD_ONLY, keyring, repeat, steady_repeat, workdir, charon, compare
    )
    if parsed != messages or result.agent.full[-1].text != text:
        raise RuntimeError("the agent rendered or parsed something else than the comparison")

    log(f"N={peers}: memory")
    charon.empty()
    memory_keys = workdir / f"keys-{peers}-memory"
    publish(memory_keys, make_keyring(peers, LOAD_ONLY))
    result.memory_base = memory("baseline")
    result.memory_agent = memory("agent", NODE, str(memory_keys), charon.uri)
    charon.empty()
    result.problems = charon.problems(mark)

    if initiator:
        mark = charon.log_mark()
        keyring = make_keyring(peers, INITIATOR)
        result.initiator = agent_phases(INITIATOR, keyring, repeat, steady_repeat, workdir, charon)[
            0
        ]
        result.initiator.problems = charon.problems(mark)
    return result


# -------------------------------------------------------------------------- report


def ms(values: list[float]) -> str:
    if not values:
        return "-"
    median, low = statistics.median(values) * 1e3, min(values) * 1e3
    return f"{median:,.1f} ({low:,.1f})" if len(values) > 1 else f"{median:,.1f}"


def mib(kb: int) -> str:
    return f"{kb / 1024:,.1f}"


def runs(values: list[Any]) -> str:
    """Every run's value in order: a constant shows as one value."""
    return str(values[0]) if len(set(values)) == 1 else ", ".join(str(v) for v in values)


def split_rows(
    label: str, results: list[Result], phase: Callable[[Result], list[StepSample]]
) -> list[tuple[str, list[str]]]:
    """One row per piece any run of any N saw, in SPLIT_ORDER; absent pieces count 0."""
    rows = []
    for piece in SPLIT_ORDER:
        if not any(piece in s.split for r in results for s in phase(r)):
            continue
        name = "of which HKDF" if piece == "hkdf" else piece
        indent = "&nbsp;&nbsp;&nbsp;&nbsp;" if piece == "hkdf" else "&nbsp;&nbsp;"
        cells = [ms([s.split.get(piece, 0.0) for s in phase(r)]) for r in results]
        rows.append((f"{indent}{label}: {name}", cells))
    return rows


def phase_rows(
    label: str, title: str, results: list[Result], phase: Callable[[Result], list[StepSample]]
) -> list[tuple[str, list[str]]]:
    """Time, its split, and what was sent, for one kind of step."""
    rows = [(f"{title}, ms", [ms([s.seconds for s in phase(r)]) for r in results])]
    rows += split_rows(label, results, phase)
    rows.append(
        (
            f"{label}: VICI messages, all (every run, in order)",
            [runs([s.messages for s in phase(r)]) for r in results],
        )
    )
    rows.append(
        (
            f"{label}: of which load-* / initiate (every run, in order)",
            [runs([f"{s.loads} / {s.initiates}" for s in phase(r)]) for r in results],
        )
    )
    return rows


def table(results: list[Result]) -> str:
    header = "| measure | " + " | ".join(f"N={r.peers}" for r in results) + " |"
    lines = [header, "|---|" + "---:|" * len(results)]

    def row(name: str, cells: list[str]) -> None:
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    def rows(pairs: list[tuple[str, list[str]]]) -> None:
        for name, cells in pairs:
            row(name, cells)

    def per(fn: Callable[[Result], str]) -> list[str]:
        return [fn(r) for r in results]

    row("rendered swanctl.conf (bytes)", per(lambda r: f"{r.conf_bytes:,}"))
    rows(
        phase_rows(
            "full",
            "**agent full reconcile** (n0 has the highest IP: loads only): step() into "
            "empty charon",
            results,
            lambda r: r.agent.full,
        )
    )
    row("**lower bound**: same load-* bodies, plain vici loop, ms", per(lambda r: ms(r.lower)))
    row("lower bound: VICI messages", per(lambda r: str(r.lower_messages)))
    row(
        "agent / lower bound (median)",
        per(lambda r: _ratio([s.seconds for s in r.agent.full], r.lower)),
    )
    row(
        "agent send load-* only / lower bound (median)",
        per(lambda r: _ratio([s.split.get("send load-*", 0.0) for s in r.agent.full], r.lower)),
    )
    row("**swanctl --load-all --file** (process wall), ms", per(lambda r: ms(r.swanctl)))
    row(
        "swanctl --load-all of an empty file (its fixed cost), ms",
        per(lambda r: ms(r.swanctl_empty)),
    )
    row("swanctl reported", per(lambda r: r.swanctl_loaded.replace("|", "/") or "-"))
    rows(
        phase_rows("steady", "**steady step**, nothing changed", results, lambda r: r.agent.steady)
    )
    rows(
        phase_rows(
            "change",
            "**one-peer change step** (a peer added each run)",
            results,
            lambda r: r.agent.change,
        )
    )
    row(
        "VICI sessions opened per step: full / steady / change (a new one clears the digests)",
        per(
            lambda r: " / ".join(
                runs([s.sessions for s in steps])
                for steps in (r.agent.full, r.agent.steady, r.agent.change)
            )
        ),
    )
    row(
        "**memory** baseline (imports only): VmRSS / VmHWM, MiB",
        per(lambda r: f"{mib(r.memory_base['VmRSS'])} / {mib(r.memory_base['VmHWM'])}"),
    )
    row(
        "agent after full reconcile: VmRSS / VmHWM, MiB",
        per(lambda r: f"{mib(r.memory_agent['VmRSS'])} / {mib(r.memory_agent['VmHWM'])}"),
    )
    row(
        "agent minus baseline: RSS / HWM, MiB",
        per(
            lambda r: (
                f"{mib(r.memory_agent['VmRSS'] - r.memory_base['VmRSS'])} / "
                f"{mib(r.memory_agent['VmHWM'] - r.memory_base['VmHWM'])}"
            )
        ),
    )
    row("memory child's VICI messages", per(lambda r: str(r.memory_agent["messages"])))
    row(
        "charon log lines reporting failures (all of the above)",
        per(lambda r: str(len(r.problems))),
    )
    with_initiator = [r for r in results if r.initiator is not None]
    if len(with_initiator) == len(results):

        def role(r: Result) -> Phases:
            assert r.initiator is not None
            return r.initiator

        rows(
            phase_rows(
                "lowest-IP full",
                "**n0 has the lowest IP** (one initiate per peer): full reconcile into "
                "empty charon",
                results,
                lambda r: role(r).full,
            )
        )
        row(
            "lowest-IP full: IKE_SAs its list-sas returned (every run)",
            per(lambda r: runs([s.sas for s in role(r).full])),
        )
        row(
            "lowest IP: **every peer initiated**: full step plus the steps that follow at "
            "once until one initiates nothing, ms",
            per(
                lambda r: ms(
                    [
                        full.seconds + sum(s.seconds for s in drain)
                        for full, drain in zip(role(r).full, role(r).drain, strict=True)
                    ]
                )
            ),
        )
        row(
            "lowest IP: initiates per step, the full step first (every run)",
            per(
                lambda r: runs(
                    [
                        "+".join(str(s.initiates) for s in [full, *drain])
                        for full, drain in zip(role(r).full, role(r).drain, strict=True)
                    ]
                )
            ),
        )
        row(
            "lowest IP: longest single step of those, ms",
            per(
                lambda r: (
                    f"{max(s.seconds for d in role(r).drain for s in d) * 1e3:.1f}"
                    + f" (full step: {ms([s.seconds for s in role(r).full])})"
                )
            ),
        )
        rows(
            phase_rows(
                "lowest-IP steady",
                "lowest IP: steady step, nothing changed (N IKE_SAs CONNECTING)",
                results,
                lambda r: role(r).steady,
            )
        )
        row(
            "lowest-IP steady: IKE_SAs its list-sas returned (every run)",
            per(lambda r: runs([s.sas for s in role(r).steady])),
        )
        rows(
            phase_rows(
                "lowest-IP change",
                "lowest IP: one-peer change step",
                results,
                lambda r: role(r).change,
            )
        )
        row(
            "lowest IP: IKE_SAs still CONNECTING at the end, terminated by the bench",
            per(lambda r: str(role(r).dropped)),
        )
        row(
            f"lowest IP: charon failure lines: `{UNREACHABLE}` / other",
            per(
                lambda r: (
                    f"{sum(UNREACHABLE in line for line in role(r).problems):,} / "
                    f"{sum(UNREACHABLE not in line for line in role(r).problems)}"
                )
            ),
        )
    return "\n".join(lines)


def _ratio(numerator: list[float], denominator: list[float]) -> str:
    return f"{statistics.median(numerator) / statistics.median(denominator):.1f}x"


def machine(charon: PrivateCharon) -> str:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.partition(":")[2].strip()
            break
    return (
        f"nproc {os.cpu_count()}, {cpu}, Python {platform.python_version()}, "
        f"vici (Python) {_version('vici')}, {charon.version()}"
    )


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--peers",
        default="1000",
        help="comma-separated peer counts N, each run in turn (default %(default)s)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per measure (default 3)")
    parser.add_argument(
        "--steady-repeat",
        type=int,
        default=10,
        help="steps with nothing changed, per N (cheap; default %(default)s)",
    )
    parser.add_argument("--out", type=Path, metavar="FILE", help="also write the table here")
    parser.add_argument("--charon", default="/usr/lib/ipsec/charon", help="charon binary")
    parser.add_argument("--swanctl", default="swanctl", help="swanctl binary")
    parser.add_argument(
        "--no-isolate",
        action="store_true",
        help="start charon plainly, not in private mount+network namespaces",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    try:
        args.peer_counts = [int(p) for p in args.peers.split(",") if p.strip()]
    except ValueError:
        parser.error(f"--peers {args.peers!r} must be comma-separated integers")
    if not args.peer_counts or min(args.peer_counts, default=0) < 1:
        parser.error("--peers must be positive")
    if args.repeat < 1 or args.steady_repeat < 1:
        parser.error("--repeat and --steady-repeat must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    isolate = not args.no_isolate and os.geteuid() == 0 and shutil.which("unshare") is not None
    workdir = Path(tempfile.mkdtemp(prefix="overlay-vici-bench."))
    charon = PrivateCharon(
        workdir,
        args.charon,
        isolate,
        extra_conf=RANDOM_PORTS,
        stdout=workdir / "charon.stdout",
        session_timeout=120,
    )
    started = time.perf_counter()
    load_before = loadavg()
    try:
        charon.start()
        log(f"charon up ({'private namespaces' if isolate else 'host namespaces'}), {workdir}")
        # Without private namespaces the initiations would leave through the host's routes.
        results = [
            run_peers(n, args.repeat, args.steady_repeat, workdir, charon, args.swanctl, isolate)
            for n in args.peer_counts
        ]
        info = machine(charon)
        problems = [
            line
            for r in results
            for line in (
                *r.problems,
                *(r.initiator.problems if r.initiator else ()),
            )
            if UNREACHABLE not in line
        ]
    except BaseException:
        log(f"charon log tail:\n{charon.tail()}")
        raise
    finally:
        charon.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    command = " ".join([os.path.relpath(sys.executable), *sys.argv])
    report = "\n".join(
        [
            f"Command: `{command}`  ",
            f"Machine: {info}  ",
            f"charon in {'private mount+net namespaces' if isolate else 'host namespaces'}; "
            f"times are median (min) over {args.repeat} runs ({args.steady_repeat} for steady "
            "steps), in ms; "
            f"whole run {time.perf_counter() - started:.0f} s; load average (1 min) "
            f"{load_before} before, {loadavg()} after (other work on the host shows here).",
            "",
            table(results),
            "",
            f"charon log lines reporting failures during the run, other than `{UNREACHABLE}` "
            f"after the lowest-IP node's initiations: {len(problems)}\n"
            + "".join(f"\n    {line}" for line in problems[:5]),
        ]
    )
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
