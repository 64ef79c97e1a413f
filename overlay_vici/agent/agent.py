"""The per-node agent: keep charon holding exactly what the keyring says.

One loop, woken by the Secret watcher or a timer: read the keyring (keeping the last
good one on any error), render and parse it, diff against charon, send the difference,
then reauthenticate IKE_SAs that predate a change of the sent generation.

The keyring's encryption switch gives the mode (keyring.Encryption.mode): 'on' keeps the
guard and trapped connections; 'prepare' loads keys and connections without traps and
brings the SAs up, so that at the moment every pair is already encrypted and nothing but
the enforcement (traps, guard) changes; 'off' unloads everything and removes the guard.
The mode changes at the keyring's moment, read from this node's clock. A removal notice
(reporter/removal.py: the install is being deleted) switches this node off at once, whatever the
keyring says.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from overlay_vici.agent.charon import (
    Charon,
    CharonCommandError,
    CharonUnavailable,
    EventWatcher,
)
from overlay_vici.agent.conf_parts import OFF, Conf, ConfParts
from overlay_vici.agent.netfilter import Guard, GuardError
from overlay_vici.agent.plan import Command, Desired, plan
from overlay_vici.agent.render import Settings, SettingsError, keyed_peers, local_node
from overlay_vici.agent.sa_plan import IkeSa, lower_ip_leads
from overlay_vici.agent.secret import SecretWatcher, read_keyring_bytes
from overlay_vici.agent.swanctl_conf import SwanctlSyntaxError
from overlay_vici.agent.upkeep import SaUpkeep
from overlay_vici.core import log
from overlay_vici.core.contract import StatusReport, conn_name, notice_at
from overlay_vici.core.files import read_json, write_atomic, write_json
from overlay_vici.core.keyring import Keyring, KeyringError, loads, parse_ip, public_bytes

# Retrying a local socket connect costs nothing: a restarted charon is reloaded within 2 s.
BACKOFF_MIN, BACKOFF_MAX = 0.5, 2.0
# A step that loads thousands of messages (a key switch at N=1,000 took 17 s in the UML
# guest, BENCHMARKS.md) writes its status this often meanwhile: the master expires an agent
# silent for --agent-timeout and would finish a rotation without it.
HEARTBEAT = 10.0


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
    # The fail-closed guard (netfilter); None leaves netfilter alone (tests on the host).
    guard: Guard | None = None
    # Written by report-lease when the agent DaemonSet is deleted (reporter/removal.py).
    removal_notice: Path | None = None
    # Called after every step with its report and duration (the metrics).
    on_step: Callable[[StepReport, float], None] | None = None
    # This node's private key (agent/node_key.py), for generations with node keys.
    node_key: X25519PrivateKey | None = None


@dataclass(frozen=True)
class Accepted:
    """The last good keyring, its raw bytes (for a cheap unchanged check), the mode it was
    rendered for, and its target."""

    raw: bytes
    keyring: Keyring
    mode: str
    target: Desired


@dataclass(frozen=True)
class StepReport:
    """What a step leaves for the metrics: the status report, charon's IKE_SAs, the
    connections loaded, the reauthentications asked for and the VICI errors so far."""

    status: StatusReport
    keyring: Keyring | None  # the keyring applied
    sas: tuple[IkeSa, ...]
    conns: frozenset[str]
    reauth_requested: tuple[str, ...]
    vici_errors: Mapping[str, int]


class Agent:
    def __init__(
        self, config: AgentConfig, charon: Charon, events: EventWatcher | None = None
    ) -> None:
        self.config = config
        self.charon = charon
        self.desired: Accepted | None = None
        self.applied: Keyring | None = None
        self.last_error: str | None = None
        self._sent_digests: dict[str, str] = {}
        self._charon_session = 0
        self.mode: str | None = None  # the mode charon was last brought to
        self.removed_at: float | None = None  # when the install's removal was noticed
        self._guard_removal_due = False  # the guard stopped dropping; its chains still to go
        self._errors: list[str] = []
        self._reported: set[str] = set()
        self._backoff = BACKOFF_MIN
        self._status_written = time.monotonic()
        self.conf_parts = ConfParts(config.settings, config.templates)
        self.unkeyed = 0  # peers with no connection for want of a public key
        own = config.node_key
        self.public_key = base64.b64encode(public_bytes(own)).decode() if own else None
        previous = read_json(config.status_path) if config.status_path else None
        self.upkeep = SaUpkeep(
            config.node,
            charon,
            self._fail,
            config.reauth_jitter,
            config.reauth_grace,
            config.resync_seconds,
            previous or {},
            events,
        )

    def run(self, stop: threading.Event) -> None:
        with SecretWatcher(self.config.secret_dir) as watcher:
            while not stop.is_set():
                watcher.changed.clear()
                # A deadline, not a count of short waits: the switch's moment is kept to the
                # tick even on a slow CPU. Short waits still notice a dropped charon and a
                # removal notice (a stat: watchdog pairs renames only after half a second).
                deadline = time.monotonic() + self.step()
                while not (
                    stop.is_set()
                    or watcher.changed.is_set()
                    or self.charon.dropped()
                    or self._removal_changed()
                ):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    watcher.changed.wait(min(0.1, remaining))
        if self._removal_changed():
            # Stopped (SIGTERM) before acting on the removal: this pass still removes the
            # guard, or the node would drop its IPIP with no agent left to undo it.
            self.step()
        self.charon.close()

    def _removal_changed(self) -> bool:
        notice = self.config.removal_notice
        return notice is not None and notice.exists() != (self.removed_at is not None)

    def step(self) -> float:
        """One reconcile pass; returns how long until the next one is due."""
        started = time.monotonic()
        self._reported, self._errors = set(self._errors), []
        self._note_removal()
        self._refresh_desired()
        wait = self.config.resync_seconds
        if self.desired is not None:
            # Before anything reaches charon, and even while charon is down: fail closed
            # (on), or stop dropping before the SAs go (off).
            self._guard(self.desired)
            try:
                wait = min(wait, self._sync(self.desired))
                self._backoff = BACKOFF_MIN
            except CharonUnavailable as exc:
                self._fail("charon unreachable", str(exc))
                wait, self._backoff = self._backoff, min(self._backoff * 2, BACKOFF_MAX)
            if self._guard_removal_due:
                self._remove_guard()
            switch_in = self.desired.keyring.encryption.wait(time.time())
            if switch_in is not None:
                wait = min(wait, switch_in)
            elif self._mode(self.desired.keyring) != self.desired.mode:
                wait = 0.0  # the moment passed during this step
        self.last_error = "; ".join(self._errors) or None
        self._write_status()
        requested, self.upkeep.requested = tuple(self.upkeep.requested), []
        if self.config.on_step is not None:
            self.config.on_step(self._step_report(requested), time.monotonic() - started)
        return wait

    def _step_report(self, requested: tuple[str, ...]) -> StepReport:
        desired = self.desired
        return StepReport(
            status=self.status(),
            keyring=self.applied,
            sas=tuple(self.upkeep.sas),
            conns=frozenset(desired.target.messages.conns if desired else ()),
            reauth_requested=requested,
            vici_errors=dict(self.charon.errors),
        )

    def _refresh_desired(self) -> None:
        try:
            raw = read_keyring_bytes(self.config.secret_dir)
            if self.desired is not None and raw == self.desired.raw:
                keyring = self.desired.keyring
                if self._mode(keyring) == self.desired.mode:
                    return
            else:
                keyring = loads(raw)
            mode = self._mode(keyring)
            conf = OFF
            if mode != "off":
                conf = self.conf_parts.build(
                    keyring, self.config.node, mode == "on", self.config.node_key
                )
        except (KeyringError, LookupError, SettingsError, SwanctlSyntaxError) as exc:
            kept = (
                f"keeping keyring serial {self.desired.keyring.serial}"
                if self.desired
                else "nothing loaded yet"
            )
            self._fail("keyring rejected", f"{exc}; {kept}")
            return
        if self.config.conf_out:
            write_atomic(self.config.conf_out, conf.text, 0o600)
        initiated = self._initiated(keyring, conf) if mode != "off" else frozenset()
        target = Desired.of(conf.messages, initiated, keep_sas=mode == "off", digests=conf.digests)
        self.desired = Accepted(raw, keyring, mode, target)
        log.info(
            "keyring accepted",
            node=self.config.node,
            serial=keyring.serial,
            sent=keyring.sent,
            accepted=list(keyring.accepted),
            peers=len(conf.messages.conns),
            encryption=mode,
            switch_at=keyring.encryption.at,
        )
        self._note_unkeyed(keyring, mode)

    def _note_unkeyed(self, keyring: Keyring, mode: str) -> None:
        """Say why peers get no connection: this node's public key, or theirs, is not in
        the keyring yet (the master publishes what the agents report)."""
        self.unkeyed = 0
        if mode == "off":
            return
        node = local_node(keyring, self.config.node)
        _, unkeyed = keyed_peers(keyring, node, self.config.node_key)
        self.unkeyed = len(unkeyed)
        if not unkeyed:
            return
        own = self.config.node_key
        if own is None or node.pub != public_bytes(own):
            log.warning(
                "waiting for the master to publish this node's public key",
                node=self.config.node,
                count=len(unkeyed),
                next_step="check that report-lease runs and the master reads its Lease",
            )
        else:
            log.warning(
                "peers without a public key get no connection yet",
                node=self.config.node,
                peers=[p.name for p in unkeyed[:10]],
                count=len(unkeyed),
                next_step="their agents have not reported yet; see overlay-vici status",
            )

    def _note_removal(self) -> None:
        if self.config.removal_notice is None:
            return
        removed_at = notice_at(read_json(self.config.removal_notice))
        if removed_at != self.removed_at:
            log.warning(
                "install removal noticed" if removed_at else "install removal withdrawn",
                node=self.config.node,
                at=removed_at,
            )
        self.removed_at = removed_at

    def _mode(self, keyring: Keyring) -> str:
        """A node outside the mesh, or whose install is being removed, is off whatever the
        switch says."""
        if self.removed_at is not None:
            return "off"
        return keyring.mode_for(self.config.node, time.time())

    def _initiated(self, keyring: Keyring, conf: Conf) -> frozenset[str]:
        """Connections this node brings up as soon as they load: those to higher IPs.

        SAs then exist before traffic needs them, and the two ends rarely both initiate.
        """
        own = parse_ip(local_node(keyring, self.config.node).ip)
        return frozenset(
            conn
            for p in keyring.peers
            if lower_ip_leads(own, parse_ip(p.ip))
            and (conn := conn_name(p.name)) in conf.messages.conns
        )

    def _sync(self, desired: Accepted) -> float:
        self.upkeep.conns = desired.target.messages.conns
        loaded_conns = self.charon.loaded_conns()
        new_session = self.charon.sessions != self._charon_session
        reconnected = new_session and self._charon_session != 0
        if new_session:
            # A new session may face a restarted charon: trust nothing sent before.
            if reconnected:
                log.warning("reconnected to charon, verifying everything", node=self.config.node)
            self._sent_digests.clear()
            self._charon_session = self.charon.sessions
            self.upkeep.forget_sas()
        commands = plan(
            desired.target,
            loaded_conns,
            self.charon.loaded_shared(),
            self._sent_digests,
        )
        failures = 0
        for command in commands:
            failures += not self._send(command)
            self._heartbeat()
        self.upkeep.schedule_initiations(desired.target.initiated, loaded_conns, reconnected)
        if commands:
            log.info(
                "reconciled",
                node=self.config.node,
                serial=desired.keyring.serial,
                commands=len(commands),
                failed=failures,
            )
        if failures == 0 and desired.keyring is not self.applied:
            self.upkeep.applied(desired.keyring, self.applied)
            self.applied = desired.keyring
        if failures == 0 and desired.mode != self.mode:
            self._enter_mode(desired)
        if desired.mode == "off":
            at = desired.keyring.encryption.at
            return self.upkeep.close_all(self.removed_at if self.removed_at is not None else at)
        return self.upkeep.maintain(self.applied is not None, bool(commands) or new_session)

    def _enter_mode(self, desired: Accepted) -> None:
        """At the switch to on, bring up at once what prepare could not (a peer that was
        not prepared yet), rather than when traffic hits the new trap."""
        log.info("encryption mode", node=self.config.node, mode=desired.mode, was=self.mode)
        if self.mode == "prepare" and desired.mode == "on":
            present = {sa.conn for sa in self.upkeep.sas}
            now = time.time()
            self.upkeep.initiate_soon((conn, now) for conn in desired.target.initiated - present)
        self.mode = desired.mode

    def _send(self, command: Command) -> bool:
        try:
            self.charon.request(command.command, command.message)
        except CharonCommandError as exc:
            if not command.must_succeed:
                return True
            self._fail(
                f"{command.command} failed",
                f"charon refused {command.command} "
                f"for {command.subject}: {exc}; check charon's log",
                peer=command.subject,
            )
            return False
        if command.command.startswith("load"):
            self._sent_digests[command.subject] = command.digest or ""
        elif command.command.startswith("unload"):
            self._sent_digests.pop(command.subject, None)
        return True

    def _guard(self, desired: Accepted) -> None:
        """On: drop all unprotected IPIP but that of nodes outside the mesh. Otherwise none:
        the guard is removed only by the switch (or an operator), never by a restart."""
        guard = self.config.guard
        if guard is None:
            return
        try:
            if desired.mode == "on":
                self._guard_removal_due = False
                guard.ensure((p.name, p.ip) for p in desired.keyring.outside)
            elif desired.mode != self.mode:
                # Leaving on: the drops stop now, before charon unloads anything (one
                # restore); the chains and jumps go at the end of the pass.
                self._guard_removal_due = True
                guard.stop_dropping()
        except GuardError as exc:
            self._fail("guard failed", str(exc))

    def _remove_guard(self) -> None:
        assert self.config.guard is not None
        try:
            self.config.guard.remove()
            self._guard_removal_due = False
        except GuardError as exc:
            self._fail("guard failed", str(exc))

    def _fail(self, event: str, message: str, **fields: Any) -> None:
        """Record for the status report; log once while the same error persists."""
        if message not in self._reported:
            log.error(event, node=self.config.node, error=message, **fields)
        self._errors.append(message)

    def status(self) -> StatusReport:
        applied = self.applied
        sas, stale = self.upkeep.sas, self.upkeep.stale
        up = {sa.conn for sa in sas if sa.state == "ESTABLISHED" and sa.children_installed}
        return {
            "node": self.config.node,
            "updated": time.time(),
            "keyring_serial": applied.serial if applied else None,
            "sent_generation": applied.sent if applied else None,
            "sent_since": self.upkeep.sent_since,
            "generations": {
                str(g.id): "sent" if g.id == applied.sent else "accepted"
                for g in applied.generations
            }
            if applied
            else {},
            "encryption": self.mode,
            "switch_at": applied.encryption.at if applied else None,
            "removed_at": self.removed_at,
            "peers_expected": len(self.desired.target.messages.conns) if self.desired else 0,
            "peers_without_key": self.unkeyed,
            "public_key": self.public_key,
            "peers_up": len(up),
            "ike_sas": len(sas),
            "stale_ike_sas": len(stale),
            "stale_peers": sorted({sa.conn for sa in stale}),
            "reauthenticated": applied is not None and not stale,
            "charon_connected": self.charon.connected,
            "guard": self._guard_status(),
            "vici_messages": self.charon.messages,
            "last_error": self.last_error,
        }

    def _guard_status(self) -> dict[str, Any] | None:
        guard = self.config.guard
        if guard is None:
            return None
        outside = guard.outside
        return {
            "backend": guard.backend,
            "installed": outside is not None,
            "outside": None if outside is None else [str(peer.ip) for peer in outside],
        }

    def _write_status(self) -> None:
        self._status_written = time.monotonic()
        if self.config.status_path:
            write_json(self.config.status_path, self.status())

    def _heartbeat(self) -> None:
        """Within a long step: the status as of the last finished step, freshly dated."""
        if time.monotonic() - self._status_written >= HEARTBEAT:
            self._write_status()
