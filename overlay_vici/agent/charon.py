"""The VICI edge: one session to one charon, with errors an operator can act on.

Not thread-safe (neither is the `vici` package): the agent's single loop owns it.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

import vici
from vici.exception import CommandException, SessionException
from vici.protocol import Message, Packet, Transport

from overlay_vici.agent.plan import initiate_message
from overlay_vici.agent.sa_plan import IkeSa
from overlay_vici.agent.sa_wire import MalformedEvent, decode_list_sa
from overlay_vici.core import log

T = TypeVar("T")


class CharonUnavailable(ConnectionError):
    """The VICI socket cannot be reached or dropped; the agent retries with backoff."""


class CharonCommandError(RuntimeError):
    """charon answered a request with success=no."""


class Charon:
    def __init__(self, uri: str, timeout: float = 30.0) -> None:
        if not uri.startswith("unix://"):
            raise ValueError(f"VICI URI {uri!r} must look like unix:///run/charon.vici")
        self.path = uri.removeprefix("unix://")
        self.timeout = timeout
        self.messages = 0
        # Bumped on every new session: a new session may face a new charon that forgot all.
        self.sessions = 0
        # For the metrics: refusals and failures per command ("connect": no session).
        self.errors: Counter[str] = Counter()
        self._session: vici.Session | None = None

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            self.errors["connect"] += 1
            raise CharonUnavailable(
                f"cannot reach charon's VICI socket {self.path} ({exc.strerror or exc}); "
                "check that the charon container runs and shares the socket"
            ) from None
        self._session = vici.Session(sock)
        self.sessions += 1

    def close(self) -> None:
        if self._session is not None:
            with contextlib.suppress(OSError):
                self._session.transport.close()
            self._session = None

    @property
    def connected(self) -> bool:
        return self._session is not None

    def dropped(self) -> bool:
        """Has charon closed our session (it stopped or restarted)? Costs one poll, no
        message: nothing else arrives on this socket between requests (no events)."""
        if self._session is None:
            return False
        sock = self._session.transport.socket
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            return bool(readable) and sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (OSError, ValueError):
            return True

    def request(self, command: str, message: dict[str, Any] | None = None) -> dict[str, Any]:
        return self._call(command, lambda session: session.request(command, message))

    def _call(self, command: str, send: Callable[[vici.Session], T]) -> T:
        """One request: count it, and turn the vici package's errors into ours."""
        session = self._require()
        self.messages += 1
        try:
            return send(session)
        except CommandException as exc:
            self.errors[command] += 1
            raise CharonCommandError(str(exc).removeprefix("Command failed: ")) from None
        except (OSError, SessionException) as exc:
            self.errors[command] += 1
            self.close()
            raise CharonUnavailable(f"VICI session to {self.path} dropped ({exc})") from None

    def _require(self) -> vici.Session:
        if self.dropped():
            self.close()  # charon restarted: a new session now, not an error first
        if self._session is None:
            self.connect()
        assert self._session is not None
        return self._session

    def loaded_conns(self) -> set[str]:
        return {_text(name) for name in self.request("get-conns").get("conns", [])}

    def loaded_shared(self) -> set[str]:
        return {_text(key_id) for key_id in self.request("get-shared").get("keys", [])}

    def ike_sas(self) -> list[IkeSa]:
        """Every IKE_SA charon holds, decoded only as far as the planner reads
        (sa_wire: the vici package's full decode was most of the cost)."""

        def listed(session: vici.Session) -> list[IkeSa]:
            payloads = _event_payloads(session.transport, "list-sas", "list-sa", {"noblock": "yes"})
            try:
                return [sa for payload in payloads for sa in decode_list_sa(payload)]
            except MalformedEvent as exc:
                raise SessionException(str(exc)) from None

        return self._call("list-sas", listed)

    def ike_sa_count(self) -> tuple[int, int]:
        """(IKE_SAs, half-open ones) from `stats`: a cheap sign that charon's set changed."""
        counts = self.request("stats").get("ikesas", {})
        return int(counts.get("total", 0)), int(counts.get("half-open", 0))

    def close_children(self, child_ids: tuple[str, ...]) -> None:
        """Delete CHILD_SAs; returns at once, charon completes each exchange."""
        for child_id in child_ids:
            self.request("terminate", {"child-id": child_id, "timeout": "-1"})

    def initiate(self, conn: str, child: str) -> None:
        """Bring a connection up; returns at once (plan.initiate_message)."""
        self.request("initiate", initiate_message(conn, child))

    def terminate(self, ike_unique_id: str, force: bool = False) -> None:
        """Delete one IKE_SA; returns at once (timeout -1), charon completes it. With force,
        charon does not wait for the peer's answer (the peer is gone or moved)."""
        message = {"ike-id": ike_unique_id, "timeout": "-1"}
        if force:
            message["force"] = "yes"
        self.request("terminate", message)


# What the metrics count from charon's events: rekeys, and its log (authentication failures).
EVENTS = ("ike-rekey", "child-rekey", "log")
# The events that change charon's IKE_SAs as the upkeep reads them (sa_plan.IkeSa): counted,
# never decoded. A CHILD_SA rekey is not among them: at rest it changes nothing the planner
# acts on, and at 1,000 peers one comes every few seconds.
SA_EVENTS = ("ike-updown", "ike-rekey", "ike-update", "child-updown")


# A wake-up that read this much found a burst: the next one comes after BURST_WAIT.
BURST_BYTES, BURST_WAIT = 1 << 16, 0.01


class EventWatcher:
    """A second VICI session, in its own thread, subscribed to `events`: each event goes to
    `handle(name, message)` (message values decoded to str). It reconnects, with backoff,
    whenever charon is away; `connected` tells whether it is subscribed now. The agent's own
    session stays request/response only (the vici package is not thread-safe).

    Without `handle`, it subscribes to SA_EVENTS only and counts them: `sa_token` changes
    whenever charon's IKE_SAs may have, so that the upkeep lists them only then
    (upkeep.SaUpkeep._list). A session of its own: charon delivers a session's events in
    order, one write at a time, and behind the log lines of 300 peers coming up (about 20
    each) the SA events arrived 40 s late in the UML guest.

    charon sends every log line of level 0 and 1 as a "log" event; with `log_filter`, only
    those whose raw message holds one of these byte strings are decoded and handed on, the
    rest are dropped unparsed (the agent shares its node's CPU with charon)."""

    def __init__(
        self,
        uri: str,
        handle: Callable[[str, dict[str, Any]], None] | None = None,
        events: tuple[str, ...] = EVENTS,
        log_filter: tuple[bytes, ...] | None = None,
        poll: float = 1.0,
    ) -> None:
        if not uri.startswith("unix://"):
            raise ValueError(f"VICI URI {uri!r} must look like unix:///run/charon.vici")
        self.path = uri.removeprefix("unix://")
        self.handle = handle
        self.events = events
        self.log_filter = log_filter
        self.poll = poll
        self.connected = False
        self.sessions = 0
        self.sa_changes = 0

    def sa_token(self) -> tuple[int, int] | None:
        """Equal at two moments only if no SA event came between them (None: not subscribed,
        so nothing is known). Events reach it within `poll` seconds."""
        return (self.sessions, self.sa_changes) if self.connected else None

    def _subscriptions(self) -> tuple[str, ...]:
        return self.events if self.handle is not None else SA_EVENTS

    def start(self, stop: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self.run, args=(stop,), name="vici-events", daemon=True)
        thread.start()
        return thread

    def run(self, stop: threading.Event) -> None:
        backoff = 0.5
        while not stop.is_set():
            sock = socket.socket(socket.AF_UNIX)
            try:
                sock.connect(self.path)
                transport = Transport(sock)
                for name in self._subscriptions():
                    _register(transport, name)
                self.sessions += 1
                self.connected = True
                backoff = 0.5
                self._listen(transport, stop)
            except Exception as exc:  # charon away, or the session broke: subscribe again
                if self.connected:
                    log.warning(
                        "VICI event session dropped, subscribing again",
                        socket=self.path,
                        error=f"{type(exc).__name__}: {exc}",
                    )
            finally:
                self.connected = False
                with contextlib.suppress(OSError):
                    sock.close()
            stop.wait(backoff)
            backoff = min(backoff * 2, 5.0)

    def _listen(self, transport: Transport, stop: threading.Event) -> None:
        """Every `poll` seconds, take whatever charon sent meanwhile: one wake-up per interval
        rather than one per log line (charon logs several lines per IKE exchange, and on a
        busy node each wake-up is CPU taken from charon itself). After a burst, at once:
        charon writes no more than the socket holds (about 200 KiB) per wake-up, and the
        events of 300 peers coming up once took 30 s to arrive at one wake-up a second."""
        sock = transport.socket
        pending = bytearray()
        wait = self.poll
        while not stop.wait(wait):
            before = len(pending)
            while True:
                try:
                    chunk = sock.recv(1 << 16, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                if not chunk:
                    raise ConnectionError("charon closed the event session")
                pending += chunk
            wait = BURST_WAIT if len(pending) - before >= BURST_BYTES else self.poll
            while len(pending) >= 4:
                length = int.from_bytes(pending[:4], "big")
                if len(pending) < 4 + length:
                    break
                raw = bytes(pending[4 : 4 + length])
                del pending[: 4 + length]
                self._dispatch(raw)

    def _dispatch(self, raw: bytes) -> None:
        if raw[:1] != bytes([Packet.EVENT]):
            return
        packet = Packet.parse(raw)
        name = _text(packet.event_type)
        if name in SA_EVENTS:
            self.sa_changes += 1
        if self.handle is None or name not in self.events:
            return
        if (
            name == "log"
            and self.log_filter is not None
            and not any(marker in raw for marker in self.log_filter)
        ):
            return
        self.handle(name, _decoded(Message.deserialize(packet.payload)))


def _register(transport: Transport, event: str, register: bool = True) -> None:
    """(Un)subscribe to one event; events already flowing meanwhile are skipped."""
    transport.send((Packet.register_event if register else Packet.unregister_event)(event))
    while True:
        reply = Packet.parse(transport.receive())
        if reply.response_type == Packet.EVENT_CONFIRM:
            return
        if reply.response_type != Packet.EVENT:
            verb = "subscribe to" if register else "unsubscribe from"
            raise SessionException(f"charon refused to {verb} {event!r}")


def _event_payloads(
    transport: Transport, command: str, event: str, message: dict[str, Any]
) -> list[bytes]:
    """A streamed request (as vici.Session.streamed_request), returning each event's raw
    message rather than decoding it."""
    _register(transport, event)
    try:
        transport.send(Packet.request(command, Message.serialize(message)))
        payloads = []
        while True:
            raw = transport.receive()
            if raw[0] == Packet.EVENT:
                payloads.append(raw[2 + raw[1] :])
            elif raw[0] == Packet.CMD_RESPONSE:
                return payloads
            else:
                raise SessionException(f"charon answered {command!r} with packet type {raw[0]}")
    finally:
        _register(transport, event, register=False)


def _decoded(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, dict):
        return {_text(k): _decoded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decoded(v) for v in value]
    return value


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
