"""overlay-vici command line: the agent, the master, previews of what the agent loads, and
the MTU helper."""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from overlay_vici import log
from overlay_vici.keyring import KeyringError
from overlay_vici.mtu import ipip_mtu
from overlay_vici.render import Settings, SettingsError, seconds

if TYPE_CHECKING:
    from overlay_vici.netfilter import Guard


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


def _settings(args: argparse.Namespace) -> Settings:
    return Settings(
        ike_proposals=args.ike_proposals,
        esp_proposals=args.esp_proposals,
        ike_rekey_time=args.ike_rekey_time,
        child_rekey_time=args.child_rekey_time,
        reauth_time=args.reauth_time,
        dpd_delay=args.dpd_delay,
    )


def duration(text: str) -> float:
    """Seconds from `90`, `90s`, `15m`, `24h` or `7d` (render.seconds), and more than 0."""
    try:
        value = seconds(text)
    except ValueError:
        value = 0.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 15m, 24h or 7d")
    return value


def _add_kube(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Kubernetes (ignored with --local)")
    group.add_argument(
        "--namespace", help="namespace of the Secret and Leases (default: the pod's, else default)"
    )
    group.add_argument(
        "--secret", default="overlay-vici-keys", help="the keyring Secret (default %(default)s)"
    )
    group.add_argument(
        "--kubeconfig", metavar="FILE", help="default: in-cluster, else ~/.kube/config"
    )
    group.add_argument("--server", metavar="URL", help=argparse.SUPPRESS)  # tests: a plain API URL


def _add_policy(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--agent-timeout",
        type=duration,
        default=90.0,
        metavar="DURATION",
        help="an agent silent this long is expired: reported, and not waited for "
        "(default 90s, three default agent resyncs)",
    )


def _add_metrics(parser: argparse.ArgumentParser, port: int) -> None:
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=port,
        metavar="PORT",
        help="serve Prometheus /metrics and /healthz on this TCP port, 0 = off "
        "(default %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="overlay-vici",
        description="Encrypt Calico IPIP traffic between Kubernetes nodes with IPsec, "
        "driving strongSwan charon over VICI.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    agent = commands.add_parser(
        "agent",
        help="run the per-node agent",
        description="Keep this node's charon loaded with one IKEv2 connection and per-pair "
        "keys for every peer in the mounted key Secret; reload when it changes.",
    )
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
        help="the higher-IP end of a pair reauthenticates this long after the lower end was "
        "due, in case the lower end's agent is down (default %(default)s)",
    )
    agent.add_argument(
        "--no-guard",
        action="store_true",
        help="do not keep the netfilter guard that drops IPIP between mesh nodes unless "
        "IPsec protects it (without it, IPIP leaves in plaintext while charon is stopped)",
    )
    agent.add_argument(
        "--iptables-backend",
        choices=["auto", "legacy", "nft"],
        default=None,
        help="iptables backend for the guard (default: $FELIX_IPTABLESBACKEND, else the one "
        "holding the host's rules, as Calico picks it)",
    )
    agent.add_argument(
        "--removal-notice",
        type=Path,
        metavar="FILE",
        help="switch this node off while this file exists: report-lease writes it when the "
        "agent DaemonSet is deleted (kubectl delete -f), never on a rolling update",
    )
    agent.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    _add_metrics(agent, 9541)
    _add_settings(agent)

    render = commands.add_parser("render", help="print what the agent tells charon")
    targets = render.add_subparsers(dest="target", required=True, metavar="TARGET")
    strongswan = targets.add_parser("strongswan", help="strongswan.conf for the charon container")
    strongswan.add_argument("--vici-socket", required=True, metavar="PATH")
    strongswan.add_argument("--log-file", metavar="PATH", help="charon's log file (optional)")
    strongswan.add_argument("--templates", type=Path, metavar="DIR")
    swanctl = targets.add_parser("swanctl", help="swanctl.conf the agent would load (holds keys)")
    swanctl.add_argument("--node", required=True)
    swanctl.add_argument("--keys", required=True, type=Path, metavar="DIR")
    _add_settings(swanctl)

    mtu = commands.add_parser(
        "mtu",
        help="largest safe IPIP (tunl0) MTU for an external MTU, or check this node's",
        description="Print the largest tunl0 MTU whose IPIP packets still fit the external "
        "MTU once wrapped in ESP (AES-GCM-128, transport mode). With --check, compare this "
        "node's tunnel MTU with that limit: exit 0 with one line if it fits, 1 with a "
        "warning naming the value to set if it is too large.",
    )
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
        action.add_argument(
            "--iptables-backend",
            choices=["auto", "legacy", "nft"],
            default=None,
            help="the backend holding the guard: the agent's --iptables-backend, if it has "
            "one (default: $FELIX_IPTABLESBACKEND, else the one holding the host's rules)",
        )

    master = commands.add_parser(
        "master",
        help="run the master: keep the keyring Secret and rotate its keys",
        description="Watch the nodes, keep the keyring (keys, phase, peer list) in the Secret "
        "and rotate the keys every --interval and on demand, each phase waiting for every "
        "live agent; switch encryption on or off on every node at one moment. With --local, "
        "files in STATE stand in for the Kubernetes API.",
    )
    master.add_argument("--local", type=Path, metavar="STATE", help="local mode: state directory")
    master.add_argument(
        "--nodes", type=Path, metavar="FILE", help="local mode: YAML or JSON list of {name, ip}"
    )
    master.add_argument(
        "--interval",
        type=duration,
        default=86400.0,
        metavar="DURATION",
        help="time between rotations (default 24h; see the README for why)",
    )
    master.add_argument(
        "--tick",
        type=duration,
        default=2.0,
        metavar="DURATION",
        help="how often to look at the agents' reports (default 2s)",
    )
    _add_policy(master)
    _add_kube(master)
    master.add_argument(
        "--identity", help="this replica's name in the leader Lease (default: the host name)"
    )
    master.add_argument(
        "--lease-duration",
        type=int,
        default=15,
        metavar="SECONDS",
        help="leader Lease duration: a failover takes up to this long (default %(default)s)",
    )
    master.add_argument(
        "--opt-out-label",
        default="overlay-vici.io/opt-out",
        help='nodes with this label set to "true" are left out (default %(default)s)',
    )
    master.add_argument(
        "--enabled-file",
        type=Path,
        metavar="FILE",
        help="Kubernetes mode: the encryption switch, a file saying true or false (the "
        "settings ConfigMap's key `enabled`, mounted), read at every step; missing: keep the "
        "keyring's (local mode reads STATE/_master/enabled)",
    )
    master.add_argument(
        "--cutover-lead",
        type=duration,
        default=10.0,
        metavar="DURATION",
        help="the least time between scheduling an encryption switch and its moment "
        "(default 10s; at least twice the time the agents took to acknowledge it)",
    )
    master.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    _add_metrics(master, 9540)

    rotate = commands.add_parser(
        "rotate", help="start a key rotation now", description="Ask the master to rotate now."
    )
    rotate.add_argument("--local", type=Path, metavar="STATE", help="local mode: state directory")
    _add_kube(rotate)

    encryption = commands.add_parser(
        "encryption",
        help="switch encryption on or off on every node at once",
        description="Set the switch the master follows: it announces the change, waits for "
        "every live agent, and publishes the moment all nodes change together. Follow it "
        "with `overlay-vici status`. Kubernetes: patch the settings ConfigMap instead.",
    )
    encryption.add_argument("state", choices=["on", "off"])
    encryption.add_argument(
        "--local", type=Path, metavar="STATE", help="local mode: state directory"
    )

    status = commands.add_parser(
        "status",
        help="show the mesh: generations, rotation, and every node's agent",
        description="Per node: generations loaded and their roles, SAs up versus expected, "
        "last error and heartbeat age; and the mesh's active generation and rotation phase.",
    )
    status.add_argument("--local", type=Path, metavar="STATE", help="local mode: state directory")
    status.add_argument("--json", action="store_true", help="print JSON")
    _add_policy(status)
    _add_kube(status)

    lease = commands.add_parser(
        "report-lease",
        help="copy an agent's status report into its Lease (its acknowledgement and heartbeat)",
        description="Run beside the agent: copy its --status report into the Lease "
        "overlay-vici-agent-NODE, which the master reads. With --daemonset, also watch the "
        "agent DaemonSet and write --removal-notice when it is deleted, so that the agent "
        "switches its node off (kubectl delete -f). Standard library only.",
    )
    lease.add_argument("--node", required=True, help="this node's name")
    lease.add_argument("--status", required=True, type=Path, metavar="FILE", help="agent's report")
    lease.add_argument("--namespace", help="default: the pod's namespace")
    lease.add_argument(
        "--heartbeat",
        type=duration,
        default=20.0,
        metavar="DURATION",
        help="renew at least this often while the agent reports (default 20s)",
    )
    lease.add_argument(
        "--daemonset",
        metavar="NAME",
        help="the agent DaemonSet, in --namespace: its deletion writes --removal-notice",
    )
    lease.add_argument(
        "--removal-notice",
        type=Path,
        metavar="FILE",
        help="the file the agent's --removal-notice reads (required with --daemonset)",
    )
    lease.add_argument("--server", metavar="URL", help="API server (default: in-cluster)")
    lease.add_argument("--token-file", type=Path, metavar="FILE", help=argparse.SUPPRESS)
    lease.add_argument("--ca-file", type=Path, metavar="FILE", help=argparse.SUPPRESS)
    lease.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except (SettingsError, KeyringError, LookupError, ValueError, *_edge_errors()) as exc:
        print(f"overlay-vici: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "mtu":
        return _mtu(args)
    if args.command == "render":
        return _render(args)
    if args.command == "guard":
        return _guard(args)
    if args.command == "master":
        return _master(args)
    if args.command == "rotate":
        return _rotate(args)
    if args.command == "encryption":
        return _encryption(args)
    if args.command == "status":
        return _status(args)
    if args.command == "report-lease":
        return _report_lease(args)
    return _agent(args)


def _mtu(args: argparse.Namespace) -> int:
    if not args.check:
        if args.external_mtu is None:
            raise ValueError("mtu needs the external MTU (EXTMTU), or --check")
        print(ipip_mtu(args.external_mtu))
        return 0
    from overlay_vici.mtu import check

    if args.external_mtu is not None:
        raise ValueError("with --check, state the network MTU as --external-mtu N")
    verdict = check(args.tunnel, args.stated_mtu)
    print(verdict.message, file=sys.stdout if verdict.ok else sys.stderr)
    return 0 if verdict.ok else 1


def _render(args: argparse.Namespace) -> int:
    from overlay_vici.render import strongswan_conf, swanctl_conf

    if args.target == "strongswan":
        print(strongswan_conf(args.vici_socket, args.log_file, args.templates), end="")
        return 0
    from overlay_vici.files import read_keyring

    keyring = read_keyring(args.keys)
    print(swanctl_conf(keyring, args.node, _settings(args), args.templates), end="")
    return 0


def _guard(args: argparse.Namespace) -> int:
    from overlay_vici.netfilter import Guard

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
    from overlay_vici.files import read_keyring

    keyring = read_keyring(args.keys)
    mode = keyring.mode_for(args.node, time.time())
    if mode != "on":
        print(f"encryption is {mode} for node {args.node} (keyring serial {keyring.serial}): "
              "no guard needed")  # fmt: skip
        return False
    guard.ensure((p.name, p.ip) for p in keyring.outside)
    return True


def _agent(args: argparse.Namespace) -> int:
    from overlay_vici.agent import Agent, AgentConfig
    from overlay_vici.charon import Charon
    from overlay_vici.netfilter import Guard

    log.setup(args.log_level)
    config = AgentConfig(
        node=args.node,
        secret_dir=args.keys,
        settings=_settings(args),
        templates=args.templates,
        conf_out=args.conf_out,
        status_path=args.status,
        resync_seconds=args.resync,
        reauth_jitter=args.reauth_jitter,
        reauth_grace=args.reauth_grace,
        guard=None if args.no_guard else Guard(args.node, args.iptables_backend),
        removal_notice=args.removal_notice,
    )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    log.info("agent starting", node=args.node, keys=str(args.keys), vici=args.vici)
    from overlay_vici.mtu import log_check

    log_check()  # warns once if tunl0's MTU is too large for IPsec
    if args.metrics_port:
        config = dataclasses.replace(config, on_step=_agent_metrics(args, stop))
    Agent(config, Charon(args.vici)).run(stop)
    log.info("agent stopped", node=args.node)
    return 0


def _agent_metrics(args: argparse.Namespace, stop: threading.Event):  # type: ignore[no-untyped-def]
    """/metrics and /healthz, and the VICI event subscription they count from."""
    from overlay_vici import metrics
    from overlay_vici.charon import EventWatcher

    agent_metrics = metrics.AgentMetrics(args.resync)
    agent_metrics.events = EventWatcher(
        args.vici, agent_metrics.on_event, log_filter=metrics.AUTH_LOG_MARKERS
    )
    agent_metrics.events.start(stop)
    metrics.start(args.metrics_port, agent_metrics.registry, agent_metrics.health, "agent")
    return agent_metrics.observe


def _edge_errors() -> tuple[type[Exception], ...]:
    """The edges' one-sentence errors, without importing `kubernetes` for other commands."""
    from overlay_vici.lease import LeaseError
    from overlay_vici.netfilter import GuardError

    kube = sys.modules.get("overlay_vici.kube")
    return (GuardError, LeaseError, kube.KubeError) if kube else (GuardError, LeaseError)


def _api_call(call, *args):  # type: ignore[no-untyped-def]
    """A one-shot command's API call: any failure becomes one sentence (exit 2)."""
    from kubernetes.client import ApiException
    from urllib3.exceptions import HTTPError

    from overlay_vici.kube import KubeError

    try:
        return call(*args)
    except ApiException as exc:
        raise KubeError(f"the Kubernetes API refused: HTTP {exc.status} {exc.reason}") from None
    except HTTPError as exc:
        raise KubeError(f"cannot reach the Kubernetes API ({type(exc).__name__})") from None


def _stop_event() -> threading.Event:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def _namespace(args: argparse.Namespace) -> str:
    from overlay_vici.lease import in_cluster_namespace

    return args.namespace or in_cluster_namespace() or "default"


def _kube_store(args: argparse.Namespace, **kwargs: object):  # type: ignore[no-untyped-def]
    try:
        from overlay_vici.kube import KubeStore, api_client
    except ImportError:
        raise ValueError(
            "Kubernetes mode needs the kubernetes package (pip install overlay-vici[master]); "
            "or pass --local STATE"
        ) from None
    api = api_client(args.kubeconfig, args.server)
    return KubeStore(api, _namespace(args), args.secret, **kwargs), api  # type: ignore[arg-type]


def _master(args: argparse.Namespace) -> int:
    from overlay_vici.master import Master
    from overlay_vici.rotation import Policy

    log.setup(args.log_level)
    policy = Policy(
        interval=args.interval, agent_timeout=args.agent_timeout, cutover_lead=args.cutover_lead
    )
    stop = _stop_event()
    if args.local:
        from overlay_vici.local import LocalStore, read_nodes

        if args.nodes is None:
            raise ValueError("--local needs --nodes FILE, the YAML or JSON list of {name, ip}")
        read_nodes(args.nodes)  # a bad list at start is a usage error
        store = LocalStore(args.local, args.nodes)
        if not store.is_leader(0):
            raise ValueError(f"another master already runs on {args.local}")
        log.info("master starting", mode="local", state=str(args.local), interval=args.interval)
        try:
            Master(store, policy, tick=args.tick, on_step=_master_metrics(args)).run(stop)
        finally:
            store.close()
        log.info("master stopped")
        return 0
    import socket

    from overlay_vici.kube import NodeWatcher

    wake = threading.Event()
    kube, api = _kube_store(
        args,
        identity=args.identity or socket.gethostname(),
        lease_duration=args.lease_duration,
        enabled_file=args.enabled_file,
    )
    kube.watcher = NodeWatcher(api, args.opt_out_label, wake=wake)
    watch_thread = threading.Thread(target=kube.watcher.run, args=(stop,), daemon=True)
    watch_thread.start()
    log.info("master starting", mode="kubernetes", namespace=kube.namespace, identity=kube.identity)
    on_step = _master_metrics(args)
    Master(kube, policy, tick=args.tick, on_step=on_step, notify=kube.record).run(stop, wake)
    kube.release()
    log.info("master stopped")
    return 0


def _master_metrics(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    if not args.metrics_port:
        return None
    from overlay_vici import metrics

    master_metrics = metrics.MasterMetrics(args.tick)
    metrics.start(args.metrics_port, master_metrics.registry, master_metrics.health, "master")
    return master_metrics.observe


def _rotate(args: argparse.Namespace) -> int:
    import secrets
    import time

    if args.local:
        from overlay_vici.local import request_rotation

        request_rotation(args.local)
    else:
        kube, _ = _kube_store(args)
        _api_call(kube.request_rotation, f"{time.time():.6f}-{secrets.token_hex(4)}")
    print("rotation requested; follow it with `overlay-vici status`")
    return 0


def _encryption(args: argparse.Namespace) -> int:
    value = "true" if args.state == "on" else "false"
    if not args.local:
        raise ValueError(
            "in Kubernetes the master follows the settings ConfigMap, so switch it there: "
            "kubectl -n overlay-vici patch configmap overlay-vici-config --type merge "
            f"""-p '{{"data":{{"enabled":"{value}"}}}}'"""
        )
    from overlay_vici.local import set_encryption

    set_encryption(args.local, args.state == "on")
    print(f"encryption {args.state} requested; follow the cutover with `overlay-vici status`")
    return 0


def _status(args: argparse.Namespace) -> int:
    import time

    from overlay_vici.master import mesh_status
    from overlay_vici.rotation import Policy

    if args.local:
        from overlay_vici.local import read_reports, read_snapshot, secret_dir

        if not (secret_dir(args.local) / "keyring.json").exists():
            raise ValueError(
                f"no keyring under {args.local}; is `overlay-vici master --local` running?"
            )
        snapshot = read_snapshot(args.local)
        names = [p["name"] for p in json.loads(snapshot.keyring or "{}").get("peers", [])]
        reports = read_reports(args.local, names)
    else:
        kube, _ = _kube_store(args)
        snapshot = _api_call(kube.read)
        if snapshot.keyring is None:
            raise ValueError(f"no Secret {kube.namespace}/{kube.secret}; is the master running?")
        reports = _api_call(kube.reports)
    view = mesh_status(snapshot, reports, time.time(), Policy(agent_timeout=args.agent_timeout))
    if args.json:
        print(json.dumps(view, indent=1, sort_keys=True))
        return 0
    print(_status_text(view), end="")
    return 0


def _status_text(view: dict) -> str:  # type: ignore[type-arg]
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
        _switch_text(view),
        rotation,
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


def _switch_text(view: dict) -> str:  # type: ignore[type-arg]
    """The encryption line of `status`: the mode now and any switch under way."""
    import time

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


def _report_lease(args: argparse.Namespace) -> int:
    from overlay_vici.lease import ApiServer, LeaseReporter, run_reporter

    log.setup(args.log_level)
    api = (
        ApiServer(args.server, args.token_file, args.ca_file)
        if args.server
        else ApiServer.in_cluster()
    )
    if (args.daemonset is None) != (args.removal_notice is None):
        raise ValueError("--daemonset and --removal-notice go together; pass both or neither")
    namespace, stop = _namespace(args), _stop_event()
    reporter = LeaseReporter(api, namespace, args.node)
    log.info("lease reporter starting", node=args.node, status=str(args.status))
    if args.daemonset:
        from overlay_vici.removal import RemovalWatch

        watch = RemovalWatch(api, namespace, args.daemonset, args.removal_notice, args.node)
        threading.Thread(target=watch.run, args=(stop,), daemon=True).start()
    run_reporter(reporter, args.status, stop, heartbeat=args.heartbeat)
    return 0
