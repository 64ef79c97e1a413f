"""The IKE_SAs' upkeep after each reconcile: what the agent does to charon's IKE_SAs, as
opposed to its configuration (overlay_vici.agent.plan).

It initiates connections when they are due, reauthenticates the IKE_SAs a change of the
sent generation made stale (make-before-break, sa_plan.plan_sas decides), closes
duplicates, IKE_SAs on old addresses and orphans, and keeps the switch's bookkeeping: when
the sent generation changed, and which IKE_SAs charon held at that moment.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Mapping
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

from overlay_vici.agent.charon import Charon, CharonCommandError, EventWatcher
from overlay_vici.agent.plan import child_name
from overlay_vici.agent.render import is_owned_conn
from overlay_vici.agent.sa_plan import (
    INITIATE_GRACE,
    IkeSa,
    Timing,
    at_rest,
    plan_sas,
)
from overlay_vici.core import log
from overlay_vici.core.contract import conn_name
from overlay_vici.core.keyring import Keyring, parse_ip

# Switching off, SAs outlive their connections by this much past the moment: longer than
# the nodes take to remove their traps (measured 0.3 s apart), so that no peer's trap meets
# a deleted SA, asks for a new one that cannot come, and leaves an acquire state behind.
OFF_SETTLE = 2.0

Fail = Callable[..., None]  # (event, message, **fields): record and log once
# At rest (sa_plan.at_rest), charon's IKE_SAs are listed again only when `stats` counts
# other numbers, when the agent changed something, when charon sent an SA event
# (EventWatcher.sa_token), or as an audit: every this many resyncs without the event
# subscription, every AUDIT_WATCHED seconds with it (in case an event was lost). A list of
# 1,000 established IKE_SAs costs charon about a second of CPU in the UML guest, `stats`
# well under a millisecond (BENCHMARKS.md).
AUDIT_RESYNCS = 4
AUDIT_WATCHED = 600.0


class SaUpkeep:
    """One node's IKE_SAs between reconciles. `sas` and `stale` are as of the last pass;
    `requested` holds the IKE_SAs asked to reauthenticate since the agent last took them."""

    def __init__(
        self,
        node: str,
        charon: Charon,
        fail: Fail,
        reauth_jitter: float,
        reauth_grace: float,
        resync: float,
        previous: Mapping[str, Any],
        events: EventWatcher | None = None,
    ) -> None:
        self.node = node
        self.charon = charon
        self.events = events
        self.fail = fail
        self.resync = resync
        self.previous = previous  # the status report a former agent left
        self.conns: Mapping[str, dict[str, Any]] = {}  # the connections loaded, by name
        self.sas: list[IkeSa] = []
        self.stale: list[IkeSa] = []
        self.requested: list[str] = []
        self.sent_since: float | None = None
        self._sent: int | None = None
        self._reauth_issued: dict[str, float] = {}
        self._initiate_due: dict[str, float] = {}  # see sa_plan.INITIATE_GRACE
        # The IKE_SAs charon held right after the new sent key was loaded: exactly the stale
        # ones (None: not known, e.g. after an agent restart; sent_since decides then).
        self._switch_ids: frozenset[str] | None = None
        self._capture_switch_ids = False
        self._peer_ips: dict[str, IPv4Address | IPv6Address] = {}
        self._rest = False  # the last plan found nothing to do (sa_plan.at_rest)
        self._counts: tuple[int, int] | None = None  # charon's `stats` at the last list
        self._token: tuple[int, int] | None = None  # EventWatcher.sa_token at the last list
        self._listed_at = 0.0  # time.monotonic() of the last list
        self._own_ip: IPv4Address | IPv6Address = ip_address("0.0.0.0")
        self._timing = Timing(
            reauth_delay=random.uniform(0, reauth_jitter),
            reauth_grace=reauth_grace,
            resync=resync,
        )

    def applied(self, keyring: Keyring, before: Keyring | None) -> None:
        """Note when the sent generation changed: IKE_SAs older than that are stale. The
        master's moment where the keyring has one: the same on every node, so that the
        IKE_SA the lower-IP end made after the switch is fresh at the other end too, however
        late that end saw the switch (by its own moment it would reauthenticate it again)."""
        switched = before is not None and keyring.sent != before.sent
        if keyring.sent_since is not None:
            self.sent_since = keyring.sent_since
            self._switch_ids, self._capture_switch_ids = None, False
        elif before is None:
            previous = self.previous
            # SAs that predate this agent are current unless the record says the sent
            # generation changed meanwhile: an agent restart must not renegotiate them.
            changed = previous.get("sent_generation") not in (None, keyring.sent)
            self.sent_since = time.time() if changed else previous.get("sent_since") or 0.0
            self._capture_switch_ids = changed
        elif switched:
            self.sent_since = time.time()
            self._capture_switch_ids = True
        self._rest = False
        if switched:
            self._reauth_issued.clear()
            log.info("sent generation switched", node=self.node, sent=keyring.sent)
        self._sent = keyring.sent
        self._peer_ips = {conn_name(p.name): parse_ip(p.ip) for p in keyring.peers}
        own = keyring.peer(self.node)
        self._own_ip = parse_ip(own.ip if own else "0.0.0.0")

    def forget_sas(self) -> None:
        """A new VICI session may face a new charon: the IKE_SAs listed were the old one's.
        None is known until the next list, so a status written meanwhile (the agent's
        heartbeat during a long reload) reports none up rather than the old charon's."""
        self.sas, self.stale, self._counts = [], [], None

    def schedule_initiations(
        self, initiated: frozenset[str], loaded_conns: set[str], reconnected: bool
    ) -> None:
        """Connections this charon did not hold: those this end leads (`initiated`) are due
        at once; those the other end would initiate are initiated too, a grace period on, if
        no IKE_SA came up by then. `maintain` initiates what is due, a batch a pass.

        A charon met for the first time (a node joining, a new pod) gets INITIATE_GRACE, so
        that the lower-IP end's initiation usually comes alone. A charon that restarted under
        this agent gets none: its lower-IP peers lost their IKE_SAs with it (on SIGTERM it
        deleted them) and their initiations during its downtime went unanswered; charon
        retransmits only after 4 s, and the pair would be down until then."""
        now = time.time()
        grace = now + (0.0 if reconnected else INITIATE_GRACE)
        self.initiate_soon(
            (name, now if name in initiated else grace)
            for name in self.conns
            if name not in loaded_conns
        )
        for name in [name for name in self._initiate_due if name not in self.conns]:
            del self._initiate_due[name]

    def initiate_soon(self, due: Iterable[tuple[str, float]]) -> None:
        """Initiate these connections (name, when) unless an IKE_SA exists by then."""
        for name, when in due:
            self._initiate_due[name] = min(self._initiate_due.get(name, when), when)

    def maintain(self, applied: bool, changed: bool) -> float:
        """Reauthenticate stale IKE_SAs, drop duplicates; return when to look again.
        `changed`: this pass sent charon something, or met a new charon."""
        if not self._list(changed):
            return self.resync
        if self._capture_switch_ids:
            self._switch_ids = frozenset(sa.unique_id for sa in self.sas)
            self._capture_switch_ids = False
        if not applied or self.sent_since is None:
            return self.resync
        now = time.time()
        decided = plan_sas(
            self.sas,
            now,
            self.sent_since,
            self._own_ip,
            self._peer_ips,
            self._reauth_issued,
            self._timing,
            self._initiate_due,
            self._switch_ids,
        )
        for conn in decided.settled:
            self._initiate_due.pop(conn, None)
        for conn in decided.initiate:
            self._initiate_due.pop(conn, None)
        self._initiate(decided.initiate, len(self._initiate_due))
        self.stale = decided.stale
        for sa in decided.reauthenticate:
            self._reauth_issued[sa.unique_id] = now
            self._act(self._reauthenticate, "reauthenticating", sa)
        for sa in decided.retire:
            if sa.child_ids:
                self._act(self._close_children, "closing the replaced CHILD_SAs", sa)
            else:
                self._act(self._terminate_now, "closing the replaced IKE_SA", sa)
        for sa in decided.terminate:
            self._act(self._terminate_now, "closing duplicate IKE_SA", sa)
        for sa in decided.moved:
            self._act(self._terminate_now, "closing IKE_SA on an old address", sa)
        for sa in decided.orphans:
            self._act(self._terminate_now, "closing IKE_SA its peer no longer has", sa)
        self._rest = at_rest(self.sas, decided, self.resync)
        return decided.wait

    def _list(self, changed: bool) -> bool:
        """Read charon's IKE_SAs into `sas` unless at rest and unchanged (see AUDIT_RESYNCS
        and AUDIT_WATCHED); returns whether it did."""
        now = time.monotonic()
        counts = self.charon.ike_sa_count()
        # Taken before the list: an event during it makes the next pass list again.
        token = self.events.sa_token() if self.events else None
        audit = AUDIT_RESYNCS * self.resync if token is None else AUDIT_WATCHED
        reasons = {
            "busy": not self._rest,
            "changed": changed,
            "initiations due": bool(self._initiate_due),
            "counts": counts != self._counts,
            "event": token != self._token,
            "audit": now >= self._listed_at + audit,
        }
        why = [reason for reason, holds in reasons.items() if holds]
        if not why:
            return False
        log.debug("listing IKE_SAs", node=self.node, why=why)
        self.sas = self._owned_sas()
        self._counts, self._token, self._listed_at = counts, token, now
        return True

    def close_all(self, since: float | None) -> float:
        """Off: once every node's traps are gone (OFF_SETTLE past `since`), close every
        IKE_SA of ours; until then they carry the traffic, so that switching off loses
        nothing."""
        self.sas = self._owned_sas()
        self.stale = []
        settle = (since or 0.0) + OFF_SETTLE - time.time()
        if settle > 0:
            return min(settle, self.resync)
        for sa in self.sas:
            self._act(self._terminate_now, "closing IKE_SA, encryption is off", sa)
        return self.resync

    def _initiate(self, conns: list[str], pending: int) -> None:
        """Bring up connections that have no IKE_SA; one log line a batch."""
        started = 0
        for conn in conns:
            child = child_name(conn, self.conns.get(conn))
            if not child:
                continue
            try:
                self.charon.initiate(conn, child)
                started += 1
            except CharonCommandError as exc:
                log.info("initiate refused", node=self.node, peer=conn, error=str(exc))
        if started:
            log.info("initiating", node=self.node, peers=started, still_due=pending)

    def _owned_sas(self) -> list[IkeSa]:
        return [sa for sa in self.charon.ike_sas() if is_owned_conn(sa.conn)]

    def _reauthenticate(self, sa: IkeSa) -> None:
        """A new IKE_SA beside the stale one (its config differs, render.ike_rand_time);
        the stale one is retired on a later pass (sa_plan.plan_sas)."""
        self.charon.initiate(sa.conn, child_name(sa.conn, self.conns.get(sa.conn)))
        self.requested.append(sa.unique_id)

    def _close_children(self, sa: IkeSa) -> None:
        self.charon.close_children(sa.child_ids)

    def _terminate_now(self, sa: IkeSa) -> None:
        """Send the DELETE but do not wait for the answer: the SA may be one its peer no
        longer has, whose CHILD_SA would swallow traffic until the retransmits give up."""
        self.charon.terminate(sa.unique_id, force=True)

    def _act(self, action: Callable[[IkeSa], None], event: str, sa: IkeSa) -> None:
        try:
            action(sa)
        except CharonCommandError as exc:
            self.fail(
                f"{event} failed",
                f"{event} {sa.conn} #{sa.unique_id} failed: {exc}; will retry",
                peer=sa.conn,
            )
            return
        log.info(event, node=self.node, peer=sa.conn, ike_sa=sa.unique_id, sent=self._sent)
