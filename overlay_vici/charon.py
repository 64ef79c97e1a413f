"""The VICI edge: one session to one charon, with errors an operator can act on.

Not thread-safe (neither is the `vici` package): the agent's single loop owns it.
"""

from __future__ import annotations

import contextlib
import select
import socket
from typing import Any

import vici
from vici.exception import CommandException, SessionException

from overlay_vici.sa_plan import IkeSa


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
        self._session: vici.Session | None = None

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
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
        session = self._require()
        self.messages += 1
        try:
            return session.request(command, message)
        except CommandException as exc:
            raise CharonCommandError(str(exc).removeprefix("Command failed: ")) from None
        except (OSError, SessionException) as exc:
            self.close()
            raise CharonUnavailable(f"VICI session to {self.path} dropped ({exc})") from None

    def _streamed(
        self, command: str, event: str, message: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        session = self._require()
        self.messages += 1
        try:
            return list(session.streamed_request(command, event, message))
        except CommandException as exc:
            raise CharonCommandError(str(exc).removeprefix("Command failed: ")) from None
        except (OSError, SessionException) as exc:
            self.close()
            raise CharonUnavailable(f"VICI session to {self.path} dropped ({exc})") from None

    def _require(self) -> vici.Session:
        if self._session is None:
            self.connect()
        assert self._session is not None
        return self._session

    def loaded_conns(self) -> set[str]:
        return {_text(name) for name in self.request("get-conns").get("conns", [])}

    def loaded_shared(self) -> set[str]:
        return {_text(key_id) for key_id in self.request("get-shared").get("keys", [])}

    def ike_sas(self) -> list[IkeSa]:
        result = []
        for event in self._streamed("list-sas", "list-sa", {"noblock": "yes"}):
            for conn, sa in event.items():
                children = sa.get("child-sas", {}) or {}
                result.append(
                    IkeSa(
                        unique_id=_text(sa.get("uniqueid", b"")),
                        conn=conn,
                        state=_text(sa.get("state", b"")),
                        established_ago=int(sa["established"]) if "established" in sa else None,
                        children_installed=sum(
                            1
                            for c in children.values()
                            if _text(c.get("state", b"")) == "INSTALLED"
                        ),
                        initiator=_text(sa.get("initiator", b"")) == "yes",
                    )
                )
        return result

    def reauthenticate(self, ike_unique_id: str) -> None:
        self.request("rekey", {"ike-id": ike_unique_id, "reauth": "yes"})

    def initiate(self, conn: str, child: str) -> None:
        """Bring a connection up; returns at once (timeout -1), the trap stays as a fallback."""
        self.request(
            "initiate", {"ike": conn, "child": child, "timeout": "-1", "init-limits": "no"}
        )

    def terminate(self, ike_unique_id: str) -> None:
        """Delete one IKE_SA; returns at once (timeout -1), charon completes it."""
        self.request("terminate", {"ike-id": ike_unique_id, "timeout": "-1"})


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
