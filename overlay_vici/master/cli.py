"""The master's wing of the command line: `master`, `rotate`, `encryption` and `status`.

`kubernetes` is imported only by the commands that talk to the API, never at start.
"""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path

from overlay_vici.core import log
from overlay_vici.core.contract import (
    DEFAULT_SECRET,
    KEYRING_FILE,
    MASTER_METRICS_PORT,
    OPT_OUT_LABEL,
)
from overlay_vici.core.options import (
    add_log_level,
    add_metrics_port,
    duration,
    namespace_of,
    stop_event,
)


def _add_local(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--local", type=Path, metavar="STATE", help="local mode: state directory")


def _add_kube(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Kubernetes (ignored with --local)")
    group.add_argument(
        "--namespace", help="namespace of the Secret and Leases (default: the pod's, else default)"
    )
    group.add_argument(
        "--secret", default=DEFAULT_SECRET, help="the keyring Secret (default %(default)s)"
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


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The master's subcommands, in the order `--help` lists them."""
    _add_master_command(commands)
    _add_rotate_command(commands)
    _add_encryption_command(commands)
    _add_status_command(commands)


def _add_master_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`overlay-vici master`: the keyring's keeper."""
    master = commands.add_parser(
        "master",
        help="run the master: keep the keyring Secret and rotate its keys",
        description="Watch the nodes, keep the keyring (keys, phase, peer list) in the Secret "
        "and rotate the keys every --interval and on demand, each phase waiting for every "
        "live agent; switch encryption on or off on every node at one moment. With --local, "
        "files in STATE stand in for the Kubernetes API.",
    )
    master.set_defaults(run=_master)
    _add_local(master)
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
        default=OPT_OUT_LABEL,
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
    add_log_level(master)
    add_metrics_port(master, MASTER_METRICS_PORT)


def _add_rotate_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`overlay-vici rotate`: a rotation now."""
    rotate = commands.add_parser(
        "rotate", help="start a key rotation now", description="Ask the master to rotate now."
    )
    rotate.set_defaults(run=_rotate)
    _add_local(rotate)
    _add_kube(rotate)


def _add_encryption_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`overlay-vici encryption on|off`: the switch, in local mode."""
    encryption = commands.add_parser(
        "encryption",
        help="switch encryption on or off on every node at once",
        description="Set the switch the master follows: it announces the change, waits for "
        "every live agent, and publishes the moment all nodes change together. Follow it "
        "with `overlay-vici status`. Kubernetes: patch the settings ConfigMap instead.",
    )
    encryption.set_defaults(run=_encryption)
    encryption.add_argument("state", choices=["on", "off"])
    _add_local(encryption)


def _add_status_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`overlay-vici status`: the mesh, node by node."""
    status = commands.add_parser(
        "status",
        help="show the mesh: generations, rotation, and every node's agent",
        description="Per node: generations loaded and their roles, SAs up versus expected, "
        "last error and heartbeat age; and the mesh's active generation and rotation phase.",
    )
    status.set_defaults(run=_status)
    _add_local(status)
    status.add_argument("--json", action="store_true", help="print JSON")
    _add_policy(status)
    _add_kube(status)


def _api_call(call, *args):  # type: ignore[no-untyped-def]
    """A one-shot command's API call: any failure becomes one sentence (exit 2)."""
    from kubernetes.client import ApiException
    from urllib3.exceptions import HTTPError

    from overlay_vici.master.kube import KubeError

    try:
        return call(*args)
    except ApiException as exc:
        raise KubeError(f"the Kubernetes API refused: HTTP {exc.status} {exc.reason}") from None
    except HTTPError as exc:
        raise KubeError(f"cannot reach the Kubernetes API ({type(exc).__name__})") from None


def _kube_store(args: argparse.Namespace, **kwargs: object):  # type: ignore[no-untyped-def]
    try:
        from overlay_vici.master.kube import KubeStore, api_client
    except ImportError:
        raise ValueError(
            "Kubernetes mode needs the kubernetes package (pip install overlay-vici[master]); "
            "or pass --local STATE"
        ) from None
    api = api_client(args.kubeconfig, args.server)
    return KubeStore(api, namespace_of(args), args.secret, **kwargs), api  # type: ignore[arg-type]


def _master(args: argparse.Namespace) -> int:
    from overlay_vici.master.master import Master
    from overlay_vici.master.rotation import Policy

    log.setup(args.log_level)
    policy = Policy(
        interval=args.interval, agent_timeout=args.agent_timeout, cutover_lead=args.cutover_lead
    )
    stop = stop_event()
    if args.local:
        from overlay_vici.master.local import LocalStore, read_nodes

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

    from overlay_vici.master.nodes import NodeWatcher

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
    from overlay_vici.core.metrics import start
    from overlay_vici.master.metrics import MasterMetrics

    master_metrics = MasterMetrics(args.tick)
    start(args.metrics_port, master_metrics.registry, master_metrics.health, "master")
    return master_metrics.observe


def _rotate(args: argparse.Namespace) -> int:
    import secrets
    import time

    if args.local:
        from overlay_vici.master.local import request_rotation

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
    from overlay_vici.master.local import set_encryption

    set_encryption(args.local, args.state == "on")
    print(f"encryption {args.state} requested; follow the cutover with `overlay-vici status`")
    return 0


def _status(args: argparse.Namespace) -> int:
    import time

    from overlay_vici.master.rotation import Policy
    from overlay_vici.master.status import mesh_status, status_text

    if args.local:
        from overlay_vici.master.local import read_reports, read_snapshot, secret_dir

        if not (secret_dir(args.local) / KEYRING_FILE).exists():
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
    print(status_text(view), end="")
    return 0
