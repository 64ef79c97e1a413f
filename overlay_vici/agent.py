"""The per-node agent: keep charon holding exactly what the keyring says.

One loop, woken by the Secret watcher or a timer: read the keyring (keeping the last
good one on any error), render and parse it, diff against charon, send the difference,
then reauthenticate IKE_SAs that predate a change of the sent generation.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Any

from overlay_vici import log
from overlay_vici.charon import Charon, CharonCommandError, CharonUnavailable, IkeSa
from overlay_vici.files import SecretWatcher, read_json, read_keyring, write_atomic, write_json
from overlay_vici.keyring import Keyring, KeyringError
from overlay_vici.plan import Command, digest, plan
from overlay_vici.render import (
    Settings,
    SettingsError,
    conn_name,
    is_owned_conn,
    local_node,
    swanctl_conf,
)
from overlay_vici.swanctl_conf import Messages, SwanctlSyntaxError, to_messages

BACKOFF_MIN, BACKOFF_MAX = 0.5, 15.0
REAUTH_POLL = 2.0


@dataclass(frozen=True)
class AgentConfig:
    node: str
    secret_dir: Path
    settings: Settings
    templates: Path | None = None
    conf_out: Path | None = None
    status_path: Path | None = None
    resync_seconds: float = 30.0
    # The lower-IP end reauthenticates within `reauth_jitter` of a switch; the other end
    # steps in after `reauth_grace` more, in case the first one's agent is down.
    reauth_jitter: float = 10.0
    reauth_grace: float = 30.0


@dataclass(frozen=True)
class Desired:
    keyring: Keyring
    messages: Messages


class Agent:
    def __init__(self, config: AgentConfig, charon: Charon) -> None:
        self.config = config
        self.charon = charon
        self.desired: Desired | None = None
        self.applied: Keyring | None = None
        self.last_error: str | None = None
        self.sent_since: float | None = None
        self.stale: list[IkeSa] = []
        self.sas: list[IkeSa] = []
        self._sent_digests: dict[str, str] = {}
        self._charon_started: str | None = None
        self._reauth_issued: set[str] = set()
        self._errors: list[str] = []
        self._reported: set[str] = set()
        self._peer_ips: dict[str, IPv4Address | IPv6Address] = {}
        self._own_ip: IPv4Address | IPv6Address = ip_address("0.0.0.0")
        self._reauth_delay = random.uniform(0, config.reauth_jitter)
        self._backoff = BACKOFF_MIN
        previous = read_json(config.status_path) if config.status_path else None
        self._previous_status = previous or {}

    def run(self, stop: threading.Event) -> None:
        with SecretWatcher(self.config.secret_dir) as watcher:
            while not stop.is_set():
                watcher.changed.clear()
                wait = self.step()
                for _ in range(int(wait / 0.1) + 1):
                    if stop.is_set() or watcher.changed.is_set():
                        break
                    watcher.changed.wait(0.1)
        self.charon.close()

    def step(self) -> float:
        """One reconcile pass; returns how long until the next one is due."""
        self._reported, self._errors = set(self._errors), []
        self._refresh_desired()
        wait = self.config.resync_seconds
        if self.desired is not None:
            try:
                wait = min(wait, self._sync(self.desired))
                self._backoff = BACKOFF_MIN
            except CharonUnavailable as exc:
                self._fail("charon unreachable", str(exc))
                wait, self._backoff = self._backoff, min(self._backoff * 2, BACKOFF_MAX)
        self.last_error = "; ".join(self._errors) or None
        self._write_status()
        return wait

    def _refresh_desired(self) -> None:
        try:
            keyring = read_keyring(self.config.secret_dir)
            if self.desired is not None and keyring == self.desired.keyring:
                return
            text = swanctl_conf(
                keyring, self.config.node, self.config.settings, self.config.templates
            )
            messages = to_messages(text)
        except (KeyringError, LookupError, SettingsError, SwanctlSyntaxError) as exc:
            kept = self.desired.keyring.serial if self.desired else None
            self._fail("keyring rejected", f"{exc}; keeping keyring serial {kept}")
            return
        if self.config.conf_out:
            write_atomic(self.config.conf_out, text, 0o600)
        self.desired = Desired(keyring, messages)
        log.info(
            "keyring accepted",
            node=self.config.node,
            serial=keyring.serial,
            sent=keyring.sent,
            accepted=list(keyring.accepted),
            peers=len(keyring.peers) - 1,
        )

    def _sync(self, desired: Desired) -> float:
        started = self.charon.started()
        if started != self._charon_started:
            if self._charon_started is not None:
                log.warning(
                    "charon restarted, reloading everything", node=self.config.node, since=started
                )
            self._sent_digests.clear()
            self._charon_started = started
        commands = plan(
            desired.messages,
            self.charon.loaded_conns(),
            self.charon.loaded_shared(),
            self._sent_digests,
        )
        failures = sum(not self._send(command) for command in commands)
        if commands:
            log.info(
                "reconciled",
                node=self.config.node,
                serial=desired.keyring.serial,
                commands=len(commands),
                failed=failures,
            )
        if failures == 0:
            self._mark_applied(desired.keyring)
        return self._reauthenticate()

    def _send(self, command: Command) -> bool:
        try:
            self.charon.request(command.command, command.message)
        except CharonCommandError as exc:
            self._fail(
                f"{command.command} failed",
                f"charon refused {command.command} "
                f"for {command.subject}: {exc}; check charon's log",
                peer=command.subject,
            )
            return False
        if command.command.startswith("unload"):
            self._sent_digests.pop(command.subject, None)
        else:
            self._sent_digests[command.subject] = digest(command.message)
        return True

    def _mark_applied(self, keyring: Keyring) -> None:
        """Note when the sent generation changed: IKE_SAs older than that are stale."""
        if self.applied is None:
            previous = self._previous_status
            resumed = previous.get("sent_generation") == keyring.sent
            self.sent_since = previous.get("sent_since") if resumed else None
            self.sent_since = self.sent_since or time.time()
        elif keyring.sent != self.applied.sent:
            self.sent_since = time.time()
            self._reauth_issued.clear()
            log.info("sent generation switched", node=self.config.node, sent=keyring.sent)
        self.applied = keyring
        self._peer_ips = {conn_name(p.name): ip_address(p.ip) for p in keyring.peers}
        self._own_ip = ip_address(local_node(keyring, self.config.node).ip)

    def _reauthenticate(self) -> float:
        """Reauthenticate IKE_SAs older than the switch; return when to look again."""
        self.sas = [sa for sa in self.charon.ike_sas() if is_owned_conn(sa.conn)]
        if self.applied is None or self.sent_since is None:
            return self.config.resync_seconds
        now = time.time()
        self.stale = [
            sa
            for sa in self.sas
            if sa.state == "ESTABLISHED"
            and sa.established_ago is not None
            and now - sa.established_ago - 1 < self.sent_since
        ]
        wait = self.config.resync_seconds
        for sa in self.stale:
            due = self.sent_since + self._reauth_delay
            if not self._initiates_reauth(sa.conn):
                due += self.config.reauth_grace
            if sa.unique_id in self._reauth_issued or now < due:
                wait = min(wait, max(due - now, REAUTH_POLL))
                continue
            self._reauth_issued.add(sa.unique_id)
            try:
                self.charon.reauthenticate(sa.unique_id)
                log.info(
                    "reauthenticating",
                    node=self.config.node,
                    peer=sa.conn,
                    ike_sa=sa.unique_id,
                    sent=self.applied.sent,
                )
            except CharonCommandError as exc:
                self._fail("reauthentication failed", f"{exc}; will retry", peer=sa.conn)
                self._reauth_issued.discard(sa.unique_id)
            wait = min(wait, REAUTH_POLL)
        return wait

    def _initiates_reauth(self, conn: str) -> bool:
        """One end per pair, the lower node IP, so that two reauthentications do not cross."""
        peer_ip = self._peer_ips.get(conn)
        return peer_ip is None or self._own_ip < peer_ip

    def _fail(self, event: str, message: str, **fields: Any) -> None:
        """Record for the status report; log once while the same error persists."""
        if message not in self._reported:
            log.error(event, node=self.config.node, error=message, **fields)
        self._errors.append(message)

    def status(self) -> dict[str, Any]:
        applied = self.applied
        up = {sa.conn for sa in self.sas if sa.state == "ESTABLISHED" and sa.children_installed}
        return {
            "node": self.config.node,
            "updated": time.time(),
            "keyring_serial": applied.serial if applied else None,
            "sent_generation": applied.sent if applied else None,
            "sent_since": self.sent_since,
            "generations": {
                str(g.id): "sent" if g.id == applied.sent else "accepted"
                for g in applied.generations
            }
            if applied
            else {},
            "peers_expected": len(applied.peers) - 1 if applied else 0,
            "peers_up": len(up),
            "ike_sas": len(self.sas),
            "stale_ike_sas": len(self.stale),
            "reauthenticated": applied is not None and not self.stale,
            "charon": {"connected": self.charon.connected, "started": self._charon_started},
            "vici_messages": self.charon.messages,
            "last_error": self.last_error,
        }

    def _write_status(self) -> None:
        if self.config.status_path:
            write_json(self.config.status_path, self.status())
