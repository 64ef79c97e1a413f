"""Kubernetes Events for what the master does that operators should see: rotations,
switches, expired agents, an unusable keyring (`k8s_event`, pure, decides which and what)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from kubernetes import client

from overlay_vici.core import log
from overlay_vici.core.contract import lease_name

EVENT_COMPONENT = "overlay-vici-master"


class EventRecorder:
    """Creates the Events in `namespace`, reported by this replica (`identity`)."""

    def __init__(self, api: client.ApiClient, namespace: str, identity: str) -> None:
        self.core = client.CoreV1Api(api)
        self.namespace = namespace
        self.identity = identity
        self._error: str | None = None

    def record(
        self,
        event: str,
        fields: Mapping[str, Any],
        secret: tuple[str, str | None],
        lease_uids: Mapping[str, str],
    ) -> None:
        """A core/v1 Event for a master event that operators should see (`k8s_event`), on
        the Secret (`secret`: name and uid; rotations, the keyring) or on the node's ack
        Lease (its agent). Best effort: a failure is logged once and the master goes on."""
        mapped = k8s_event(event, fields)
        if mapped is None:
            return
        kind, reason, message, node = mapped
        if node is None:
            involved = {
                "apiVersion": "v1",
                "kind": "Secret",
                "namespace": self.namespace,
                "name": secret[0],
            }
            uid = secret[1]
        else:
            involved = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "namespace": self.namespace,
                "name": lease_name(node),
            }
            uid = lease_uids.get(node)
        if uid:  # kubectl describe finds an object's Events by its uid
            involved["uid"] = uid
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        body = {
            "metadata": {
                # As client-go names them: the object's name and a unique suffix.
                "name": f"{involved['name']}.{time.time_ns():x}",
                "namespace": self.namespace,
                "labels": {"app.kubernetes.io/name": "overlay-vici"},
            },
            "involvedObject": involved,
            "type": kind,
            "reason": reason,
            "message": message,
            "source": {"component": EVENT_COMPONENT},
            "reportingComponent": EVENT_COMPONENT,
            "reportingInstance": self.identity,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            self.core.create_namespaced_event(self.namespace, body, _request_timeout=10)
            self._error = None
        except Exception as exc:  # an Event is worth less than the master's next step
            error = (
                f"{exc.status} {exc.reason}" if isinstance(exc, client.ApiException) else str(exc)
            )
            if error != self._error:
                log.error("cannot record a Kubernetes Event", reason=reason, error=error)
            self._error = error


def k8s_event(event: str, fields: Mapping[str, Any]) -> tuple[str, str, str, str | None] | None:
    """The Kubernetes Event for a master event (the log events of overlay_vici.master.rotation, and
    "keyring unusable"): (type, reason, message, node), node naming the agent it is about,
    None for the Secret; None for events that stay in the log. Pure."""
    rotation = fields.get("rotation")
    skipped = fields.get("skipped")
    without = f", without the agents of {', '.join(skipped)}" if skipped else ""
    if event == "rotation started":
        return (
            "Normal",
            "RotationStarted",
            f"Rotation {rotation} started ({fields.get('reason')}): phase stage began, "
            f"generation {fields.get('new')} is accepted but not yet sent.",
            None,
        )
    if event == "rotation phase switch":
        return (
            "Normal",
            "RotationPhaseSwitch",
            f"Rotation {rotation}: phase stage finished{without}; phase switch began, "
            f"generation {fields.get('sent')} is sent and agents reauthenticate.",
            None,
        )
    if event == "rotation phase retire":
        return (
            "Normal",
            "RotationPhaseRetire",
            f"Rotation {rotation}: phase switch finished{without}; phase retire began, "
            "the old generation is removed.",
            None,
        )
    if event == "rotation done":
        return (
            "Normal",
            "RotationDone",
            f"Rotation {rotation} done: phase retire finished{without}; generation "
            f"{fields.get('sent')} is the only key.",
            None,
        )
    state = "on" if fields.get("enabled") else "off"
    if event == "encryption switch announced":
        return (
            "Normal",
            "EncryptionSwitchAnnounced",
            f"Encryption switch to {state} announced: once every live agent has this keyring, "
            "the master schedules the moment all nodes change together.",
            None,
        )
    if event == "encryption switch scheduled":
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(fields.get("at", 0))))
        return (
            "Normal",
            "EncryptionSwitchScheduled",
            f"Every node switches encryption {state} at {at}, "
            f"{fields.get('lead')} s from now{without}.",
            None,
        )
    if event == "encryption switch reverted":
        return (
            "Normal",
            "EncryptionSwitchReverted",
            f"The announced encryption switch was withdrawn before its moment was set: "
            f"encryption stays {state}.",
            None,
        )
    if event == "agent expired, not waiting for it":
        node = str(fields.get("node"))
        return (
            "Warning",
            "AgentExpired",
            f"The agent on node {node} stopped reporting: rotations go on without it, and "
            "new IKE_SAs with its node may fail until it is back.",
            node,
        )
    if event == "agent back or gone":
        node = str(fields.get("node"))
        return (
            "Normal",
            "AgentNotExpired",
            f"The agent on node {node} is no longer expired (it reports again, or its node "
            "left the mesh).",
            node,
        )
    if event == "keyring unusable":
        error = str(fields.get("error"))[:800]
        return (
            "Warning",
            "KeyringUnparseable",
            f"The Secret's keyring cannot be parsed ({error}); agents keep their last good "
            "keys and no rotation runs: fix or delete the Secret.",
            None,
        )
    return None
