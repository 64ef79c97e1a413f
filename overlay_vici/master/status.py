"""What `overlay-vici status` shows: the mesh's view (`mesh_status`, pure, the same in
local and Kubernetes mode; `--json` prints it) and its text form (`status_text`)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from overlay_vici.core.contract import AgentReport
from overlay_vici.master.master import Snapshot, parse
from overlay_vici.master.rotation import (
    MasterState,
    Policy,
    classify,
    completed,
    consistent,
    cutover_pending,
    cutover_waiting,
    phase_waiting,
)


def mesh_status(
    snapshot: Snapshot,
    reports: Mapping[str, AgentReport],
    now: float,
    policy: Policy,
) -> dict[str, Any]:
    """What `overlay-vici status` shows: the mesh's generation and phase, and per node its
    agent's report. Pure: the same view in local and Kubernetes mode."""
    parsed = parse(snapshot)
    keyring = parsed.keyring
    if keyring is None:
        return {
            "active_generation": None,
            "rotating": False,
            "encryption": None,
            "serial": None,
            "nodes": [],
        }
    state = consistent(keyring, parsed.state or MasterState())
    live, expired, absent = classify(keyring.peers, reports, now, policy)
    live_names = set(live)
    nodes = []
    for peer in keyring.peers:
        report = reports.get(peer.name)
        entry: dict[str, Any] = {
            "node": peer.name,
            "ip": peer.ip,
            "agent": "live" if peer.name in live else "expired" if report else "absent",
            "public_key": _key_state(peer.pub, report),
        }
        if report is not None:
            entry.update(
                heartbeat_age=round(now - report.heartbeat, 1),
                keyring_serial=report.keyring_serial,
                generations=dict(report.generations),
                peers_up=report.peers_up,
                peers_expected=report.peers_expected,
                stale_ike_sas=report.stale_ike_sas,
                reauthenticated=report.reauthenticated,
                last_error=report.last_error,
                encryption=report.encryption,
                phase_done=state.rotating
                and completed(report, state.phase, state.phase_serial, keyring.sent, live_names),
            )
        nodes.append(entry)
    due = (state.last_rotation or now) + policy.interval
    switch, mode = keyring.encryption, keyring.encryption.mode(now)
    if state.rotating:
        waiting = phase_waiting(state, live, keyring.sent)
    else:
        waiting = cutover_waiting(state, live) if switch.at is None else ()
    return {
        "active_generation": keyring.sent,
        "generations": {
            str(g.id): "sent" if g.id == keyring.sent else "accepted" for g in keyring.generations
        },
        "serial": keyring.serial,
        "rotating": state.rotating,
        "encryption": {
            "enabled": switch.enabled,
            "mode": mode,
            "at": switch.at,
            "pending": cutover_pending(switch, now),
            # Live agents that report another mode than the keyring's now.
            "lagging": sorted(n for n, r in live.items() if r.encryption not in (None, mode)),
        },
        "phase": state.phase,
        "rotation": state.rotation,
        "rotation_requested": bool(snapshot.request and snapshot.request != state.handled_request),
        "last_rotation": state.last_rotation,
        "next_rotation_due": due,
        "waiting": list(waiting),
        "expired": list(expired),
        "absent": list(absent),
        "outside": [p.name for p in keyring.outside],
        "node_keys": keyring.generation(keyring.sent).node_keys,
        "without_public_key": [p.name for p in keyring.peers if p.pub is None],
        "history": [dict(h) for h in state.history],
        "nodes": nodes,
    }


def _key_state(published: bytes | None, report: AgentReport | None) -> str:
    """The node's public key as the keyring has it: 'published', 'missing' (its pairs get
    no connection in a generation with node keys), or 'changed' (the agent reports another
    one: the master has not published it yet)."""
    if published is None:
        return "missing"
    if report is not None and report.public_key not in (None, published):
        return "changed"
    return "published"


def keys_text(view: dict) -> str:  # type: ignore[type-arg]
    """The node keys line of `status`."""
    if not view["node_keys"]:
        return (
            f"generation {view['active_generation']} derives every pair's key from one root key "
            "(no node keys): run `overlay-vici rotate` once every agent reports a public key"
        )
    line = f"generation {view['active_generation']} binds each pair's key to both nodes' keys"
    if view["without_public_key"]:
        missing = ", ".join(view["without_public_key"])
        line += f"; no public key yet, so no connection to: {missing}"
    return line


def status_text(view: dict) -> str:  # type: ignore[type-arg]
    """`overlay-vici status` without --json: the mesh's lines, then one row per node."""
    roles = ", ".join(f"{g} {r}" for g, r in view["generations"].items())
    if view["rotating"]:
        rotation = f"rotation {view['rotation']} under way, phase {view['phase']}"
        if view["waiting"]:
            rotation += f", waiting for {', '.join(view['waiting'])}"
    else:
        rotation = "no rotation under way" + (
            " (one requested)" if view["rotation_requested"] else ""
        )
        if view["encryption"]["pending"] or view["encryption"]["mode"] == "off":
            rotation += "; rotations wait until encryption is on and no switch is pending"
    lines = [
        f"active generation {view['active_generation']} (keyring serial {view['serial']}: {roles})",
        switch_text(view),
        rotation,
        keys_text(view),
    ]
    if view["expired"]:
        lines.append(f"expired agents, not waited for: {', '.join(view['expired'])}")
    if view["outside"]:
        lines.append(f"outside the mesh, IPIP to them unencrypted: {', '.join(view['outside'])}")
    rows = [("NODE", "AGENT", "HEARTBEAT", "SERIAL", "SAS UP", "GENERATIONS", "LAST ERROR")]
    for node in view["nodes"]:
        if "keyring_serial" not in node:
            rows.append((node["node"], node["agent"], "-", "-", "-", "-", "-"))
            continue
        serial = node["keyring_serial"]
        rows.append(
            (
                node["node"],
                node["agent"],
                f"{node['heartbeat_age']}s",
                "-" if serial is None else str(serial),
                f"{node['peers_up']}/{node['peers_expected']}",
                ",".join(f"{g}:{r}" for g, r in sorted(node["generations"].items())) or "-",
                node["last_error"] or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1]
        for row in rows
    ]
    return "\n".join(lines) + "\n"


def switch_text(view: dict) -> str:  # type: ignore[type-arg]
    """The encryption line of `status`: the mode now and any switch under way."""
    switch = view["encryption"]
    target = "on" if switch["enabled"] else "off"
    line = f"encryption {switch['mode']}"
    if switch["at"] is None:
        waiting = ", ".join(view["waiting"])
        line += f", switch to {target} announced, " + (
            f"waiting for {waiting}" if waiting else "being scheduled"
        )
    elif switch["pending"]:
        moment = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(switch["at"]))
        line += f", switching {target} at {moment}.{int(switch['at'] % 1 * 1000):03d}Z"
    if switch["lagging"]:
        line += f"; agents not yet {switch['mode']}: {', '.join(switch['lagging'])}"
    return line
