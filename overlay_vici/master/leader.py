"""Leader election on a Lease: only the leading master replica writes the Secret."""

from __future__ import annotations

import datetime as dt
from collections import Counter

from kubernetes import client

from overlay_vici.core import log

DEFAULT_LEADER_LEASE = "overlay-vici-master"


class LeaderElection:
    """Holds the leader Lease `name` for `identity`, renewing it at every step."""

    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        identity: str,
        conflicts: Counter[str],
        name: str = DEFAULT_LEADER_LEASE,
        duration: int = 15,
    ) -> None:
        self.coordination = client.CoordinationV1Api(api)
        self.namespace = namespace
        self.identity = identity
        self.name = name
        self.lease_duration = duration
        self.conflicts = conflicts  # 409s, counted under "lease" (shared with the store)

    def is_leader(self, now: float) -> bool:
        """Acquire or renew the leader Lease; a 409 means another replica got there first."""
        try:
            lease = self.coordination.read_namespaced_lease(self.name, self.namespace)
        except client.ApiException as exc:
            if exc.status != 404:
                raise
            body = {
                "metadata": {"name": self.name},
                "spec": {
                    "holderIdentity": self.identity,
                    "leaseDurationSeconds": self.lease_duration,
                    "acquireTime": _micro_time(now).isoformat(),
                    "renewTime": _micro_time(now).isoformat(),
                    "leaseTransitions": 0,
                },
            }
            try:
                self.coordination.create_namespaced_lease(self.namespace, body)
                return True
            except client.ApiException as exc2:
                if exc2.status == 409:
                    self.conflicts["lease"] += 1
                    return False
                raise
        spec = lease.spec
        holder = spec.holder_identity or None
        renewed = spec.renew_time.timestamp() if spec.renew_time else 0.0
        expired = now > renewed + (spec.lease_duration_seconds or self.lease_duration)
        if holder not in (None, self.identity) and not expired:
            return False
        if holder != self.identity:
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
            spec.acquire_time = _micro_time(now)
            log.info("taking over the leader lease", previous=holder, expired=expired)
        spec.holder_identity = self.identity
        spec.renew_time = _micro_time(now)
        spec.lease_duration_seconds = self.lease_duration
        try:
            self.coordination.replace_namespaced_lease(self.name, self.namespace, lease)
            return True
        except client.ApiException as exc:
            if exc.status == 409:
                self.conflicts["lease"] += 1
                return False
            raise

    def release(self) -> None:
        """Give the leader Lease up on a clean stop, so that a standby takes over at once."""
        try:
            lease = self.coordination.read_namespaced_lease(self.name, self.namespace)
            if lease.spec.holder_identity == self.identity:
                lease.spec.holder_identity = ""
                lease.spec.renew_time = _micro_time(0)
                self.coordination.replace_namespaced_lease(self.name, self.namespace, lease)
        except client.ApiException:
            pass


def _micro_time(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, dt.UTC)
