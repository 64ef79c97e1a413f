"""The agent's wing of the command line: `agent`, `render`, `mtu` and `guard`."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from overlay_vici.agent.mtu import ipip_mtu
from overlay_vici.agent.render import Settings
from overlay_vici.core import log
from overlay_vici.core.contract import AGENT_METRICS_PORT
from overlay_vici.core.options import add_log_level, add_metrics_port, stop_event

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from overlay_vici.agent.netfilter import Guard


def _add_node_keys(parser: argparse.ArgumentParser) -> None:
    """This node and its mounted keyring: what the agent and the guard's install read."""
    parser.add_argument("--node", required=True, help="this node's name, as in the keyring")
    parser.add_argument(
        "--keys",
        required=True,
        type=Path,
        metavar="DIR",
        help="directory of the mounted key Secret (holds keyring.json)",
    )


def _add_settings(parser: argparse.ArgumentParser) -> None:
    defaults = Settings()
    group = parser.add_argument_group("IPsec settings (what charon is told)")
    group.add_argument(
        "--ike-proposals", default=defaults.ike_proposals, help="IKE proposal (default %(default)s)"
    )
    group.add_argument(
        "--esp-proposals",
        default=defaults.esp_proposals,
        help="ESP proposal for the IPIP CHILD_SA (default %(default)s)",
    )
    group.add_argument(
        "--ike-rekey-time",
        default=defaults.ike_rekey_time,
        help="IKE_SA rekey interval (default %(default)s)",
    )
    group.add_argument(
        "--child-rekey-time",
        default=defaults.child_rekey_time,
        help="CHILD_SA rekey interval (default %(default)s)",
    )
    group.add_argument(
        "--reauth-time",
        default=defaults.reauth_time,
        help="periodic IKE reauthentication, 0 = only on key rotation (default %(default)s)",
    )
    group.add_argument(
        "--dpd-delay",
        default=defaults.dpd_delay,
        help="dead peer detection interval (default %(default)s)",
    )
    parser.add_argument(
        "--templates",
        type=Path,
        metavar="DIR",
        help="directory whose swanctl.conf.j2 / strongswan.conf.j2 override the built-in templates",
    )


def settings(args: argparse.Namespace) -> Settings:
    return Settings(
        ike_proposals=args.ike_proposals,
        esp_proposals=args.esp_proposals,
        ike_rekey_time=args.ike_rekey_time,
        child_rekey_time=args.child_rekey_time,
        reauth_time=args.reauth_time,
        dpd_delay=args.dpd_delay,
    )


def _add_iptables_backend(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument(
        "--iptables-backend", choices=["auto", "legacy", "nft"], default=None, help=help
    )


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The agent's subcommands, in the order `--help` lists them."""
    _add_agent_command(commands)
    _add_render_command(commands)
    _add_mtu_command(commands)
    _add_guard_command(commands)


def _add_agent_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`overlay-vici agent`: the per-node loop."""
    agent = commands.add_parser(
        "agent",
        help="run the per-node agent",
        description="Keep this node's charon loaded with one IKEv2 connection and per-pair "
        "keys for every peer in the mounted key Secret; reload when it changes.",
    )
    agent.set_defaults(run=_agent)
    _add_node_keys(agent)
    agent.add_argument(
        "--vici",
        required=True,
        metavar="URI",
        help="charon's VICI socket, e.g. unix:///run/charon.vici",
    )
    agent.add_argument(
        "--status",
        type=Path,
        metavar="FILE",
        help="write a JSON status report here after every pass",
    )
    agent.add_argument(
        "--conf-out",
        type=Path,
        metavar="FILE",
        help="write the rendered swanctl.conf here (mode 0600; holds keys)",
    )
    agent.add_argument(
        "--resync",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="full resync interval, a safety net for missed events (default %(default)s)",
    )
    agent.add_argument(
        "--reauth-jitter",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="spread reauthentications after a key switch over this long (default %(default)s)",
    )
    agent.add_argument(
        "--reauth-grace",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="the higher-IP end of a pair reauthenticates this long, plus 0.1 s per node (the "
        "lower end's queue), after the lower end was due, in case the lower end's agent is "
        "down (default %(default)s)",
    )
    agent.add_argument(
        "--no-guard",
        action="store_true",
        help="do not keep the netfilter guard that drops IPIP between mesh nodes unless "
        "IPsec protects it (without it, IPIP leaves in plaintext while charon is stopped)",
    )
    _add_iptables_backend(
        agent,
        "iptables backend for the guard (default: $FELIX_IPTABLESBACKEND, else the one "
        "holding the host's rules, as Calico picks it)",
    )
    agent.add_argument(
        "--removal-notice",
        type=Path,
        metavar="FILE",
        help="switch this node off while this file exists: report-lease writes it when the "
        "agent DaemonSet is deleted (kubectl delete -f), never on a rolling update",
    )
    _add_node_key(agent, "made on first start (mode 0600) and kept")
    add_log_level(agent)
    add_metrics_port(agent, AGENT_METRICS_PORT)
    _add_settings(agent)


def _add_node_key(parser: argparse.ArgumentParser, made: str) -> None:
    from overlay_vici.agent.node_key import DEFAULT_PATH

    parser.add_argument(
        "--node-key",
        type=Path,
        default=DEFAULT_PATH,
        metavar="FILE",
        help=f"this node's X25519 private key, {made}: the PSKs of generations with node "
        "keys need it, and only its public key leaves the node (default %(default)s)",
    )


def _add_render_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`overlay-vici render strongswan|swanctl`: previews."""
    render = commands.add_parser("render", help="print what the agent tells charon")
    render.set_defaults(run=_render)
    targets = render.add_subparsers(dest="target", required=True, metavar="TARGET")
    strongswan = targets.add_parser("strongswan", help="strongswan.conf for the charon container")
    strongswan.add_argument("--vici-socket", required=True, metavar="PATH")
    strongswan.add_argument("--log-file", metavar="PATH", help="charon's log file (optional)")
    strongswan.add_argument("--templates", type=Path, metavar="DIR")
    swanctl = targets.add_parser("swanctl", help="swanctl.conf the agent would load (holds keys)")
    swanctl.add_argument("--node", required=True)
    swanctl.add_argument("--keys", required=True, type=Path, metavar="DIR")
    _add_node_key(swanctl, "read if it exists")
    _add_settings(swanctl)


def _add_mtu_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`overlay-vici mtu`: the largest safe tunl0 MTU, or a check of this node's."""
    mtu = commands.add_parser(
        "mtu",
        help="largest safe IPIP (tunl0) MTU for an external MTU, or check this node's",
        description="Print the largest tunl0 MTU whose IPIP packets still fit the external "
        "MTU once wrapped in ESP (AES-GCM-128, transport mode). With --check, compare this "
        "node's tunnel MTU with that limit: exit 0 with one line if it fits, 1 with a "
        "warning naming the value to set if it is too large.",
    )
    mtu.set_defaults(run=_mtu)
    mtu.add_argument("external_mtu", type=int, nargs="?", metavar="EXTMTU")
    mtu.add_argument(
        "--check", action="store_true", help="check this node's tunnel MTU (see above)"
    )
    mtu.add_argument(
        "--tunnel", default="tunl0", help="with --check: the IPIP device (default %(default)s)"
    )
    mtu.add_argument(
        "--external-mtu",
        dest="stated_mtu",
        type=int,
        metavar="N",
        help="with --check: the network's MTU (default: the smallest MTU of the up, "
        "non-tunnel interfaces carrying the default route or a network route)",
    )


def _add_guard_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`overlay-vici guard show|remove|install`."""
    guard = commands.add_parser(
        "guard",
        help="install, show or remove this node's guard (netfilter rules that drop "
        "unencrypted IPIP)",
        description="While encryption is on, the agent keeps a guard on its node: iptables "
        "rules (raw OUTPUT, mangle INPUT) that drop every IPIP packet IPsec does not protect, "
        "both ways, except to and from the nodes outside the mesh. It outlives the agent; only "
        "the disable removes it. Run this as root in the node's network namespace: on the "
        "node, or in a hostNetwork pod with NET_ADMIN such as the agent's container.",
    )
    guard.set_defaults(run=_guard)
    guard_actions = guard.add_subparsers(dest="action", required=True, metavar="ACTION")
    guard_show = guard_actions.add_parser(
        "show",
        help="print the backend and the nodes whose IPIP may stay plaintext",
        description="Print the iptables backend and the guard's allow-list (the nodes outside "
        "the mesh). Exit 0 if the guard is whole, 1 if it is not installed or only in part.",
    )
    guard_remove = guard_actions.add_parser(
        "remove",
        help="delete the guard's rules and chains (IPIP may then leave unencrypted)",
        description="Delete the guard's jumps and chains from both tables, nothing else. "
        "Needed where the agents were deleted without the disable: the guard stays and keeps "
        "blocking the node's pod traffic to other nodes. An agent still running with "
        "encryption on puts the guard back within its --resync.",
    )
    guard_install = guard_actions.add_parser(
        "install",
        help="install the guard now if the keyring has encryption on for this node",
        description="What the agent's first pass does before it talks to charon, as a command "
        "of its own: the agent pod's init container runs it, so that a node whose guard a "
        "reboot erased gets it back before charon and the agent start, and even if the agent "
        "cannot. Prints what it left installed; exit 2 if the keyring cannot be read.",
    )
    _add_node_keys(guard_install)
    for action in (guard_show, guard_remove, guard_install):
        _add_iptables_backend(
            action,
            "the backend holding the guard: the agent's --iptables-backend, if it has "
            "one (default: $FELIX_IPTABLESBACKEND, else the one holding the host's rules)",
        )


def _mtu(args: argparse.Namespace) -> int:
    if not args.check:
        if args.external_mtu is None:
            raise ValueError("mtu needs the external MTU (EXTMTU), or --check")
        print(ipip_mtu(args.external_mtu))
        return 0
    from overlay_vici.agent.mtu import check

    if args.external_mtu is not None:
        raise ValueError("with --check, state the network MTU as --external-mtu N")
    verdict = check(args.tunnel, args.stated_mtu)
    print(verdict.message, file=sys.stdout if verdict.ok else sys.stderr)
    return 0 if verdict.ok else 1


def _render(args: argparse.Namespace) -> int:
    from overlay_vici.agent.render import strongswan_conf, swanctl_conf

    if args.target == "strongswan":
        print(strongswan_conf(args.vici_socket, args.log_file, args.templates), end="")
        return 0
    from overlay_vici.agent.node_key import read
    from overlay_vici.agent.secret import read_keyring

    keyring = read_keyring(args.keys)
    own = read(args.node_key)
    print(swanctl_conf(keyring, args.node, settings(args), args.templates, own=own), end="")
    return 0


def _guard(args: argparse.Namespace) -> int:
    from overlay_vici.agent.netfilter import Guard

    log.setup("error")  # the printed lines say what happened
    guard = Guard(getattr(args, "node", ""), args.iptables_backend)
    if args.action == "remove":
        removed = guard.remove()
        print(f"{'guard removed' if removed else 'no guard installed'} (iptables-{guard.backend})")
        return 0
    if args.action == "install" and not _install_guard(args, guard):
        return 0
    outside, present = guard.installed()
    where = f"iptables-{guard.backend}"
    if outside is None:
        print(
            f"guard partly installed ({where}): the agent's next pass completes it, "
            "`overlay-vici guard remove` takes it away"
            if present
            else f"guard not installed ({where})"
        )
        return 1
    scope = (
        "except to and from the nodes outside the mesh:"
        if outside
        else "no node is outside the mesh"
    )
    print(f"guard installed ({where}): unprotected IPIP is dropped both ways; {scope}")
    for peer in outside:
        print(f"  {peer.ip}  {peer.name}")
    return 0


def _install_guard(args: argparse.Namespace, guard: Guard) -> bool:
    """Install the guard as the agent would at this moment; False if encryption is not on."""
    from overlay_vici.agent.secret import read_keyring

    keyring = read_keyring(args.keys)
    mode = keyring.mode_for(args.node, time.time())
    if mode != "on":
        print(f"encryption is {mode} for node {args.node} (keyring serial {keyring.serial}): "
              "no guard needed")  # fmt: skip
        return False
    guard.ensure((p.name, p.ip) for p in keyring.outside)
    return True


def _node_key(args: argparse.Namespace) -> X25519PrivateKey:
    from overlay_vici.agent.node_key import load_or_create

    key, made = load_or_create(args.node_key)
    log.info(
        "node key made" if made else "node key loaded", node=args.node, file=str(args.node_key)
    )
    return key


def _agent(args: argparse.Namespace) -> int:
    from overlay_vici.agent.agent import Agent, AgentConfig
    from overlay_vici.agent.charon import Charon, EventWatcher
    from overlay_vici.agent.netfilter import Guard

    log.setup(args.log_level)
    config = AgentConfig(
        node=args.node,
        secret_dir=args.keys,
        settings=settings(args),
        templates=args.templates,
        conf_out=args.conf_out,
        status_path=args.status,
        resync_seconds=args.resync,
        reauth_jitter=args.reauth_jitter,
        reauth_grace=args.reauth_grace,
        guard=None if args.no_guard else Guard(args.node, args.iptables_backend),
        removal_notice=args.removal_notice,
        node_key=_node_key(args),
    )
    stop = stop_event()
    log.info("agent starting", node=args.node, keys=str(args.keys), vici=args.vici)
    from overlay_vici.agent.mtu import log_check

    log_check()  # warns once if tunl0's MTU is too large for IPsec
    if args.metrics_port:
        config = dataclasses.replace(config, on_step=_agent_metrics(args, stop))
    sa_events = EventWatcher(args.vici)
    sa_events.start(stop)
    Agent(config, Charon(args.vici), sa_events).run(stop)
    log.info("agent stopped", node=args.node)
    return 0


def _agent_metrics(args: argparse.Namespace, stop: threading.Event):  # type: ignore[no-untyped-def]
    """/metrics and /healthz, and the VICI event subscription they count from."""
    from overlay_vici.agent import metrics
    from overlay_vici.agent.charon import EventWatcher
    from overlay_vici.core.metrics import start

    agent_metrics = metrics.AgentMetrics(args.resync)
    agent_metrics.events = EventWatcher(
        args.vici, agent_metrics.on_event, log_filter=metrics.AUTH_LOG_MARKERS
    )
    agent_metrics.events.start(stop)
    start(args.metrics_port, agent_metrics.registry, agent_metrics.health, "agent")
    return agent_metrics.observe
