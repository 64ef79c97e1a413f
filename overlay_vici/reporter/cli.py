"""report-lease's command line: the agent pod's second container."""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

from overlay_vici.core import log
from overlay_vici.core.options import add_log_level, duration, namespace_of, stop_event


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    lease = commands.add_parser(
        "report-lease",
        help="copy an agent's status report into its Lease (its acknowledgement and heartbeat)",
        description="Run beside the agent: copy its --status report into the Lease "
        "overlay-vici-agent-NODE, which the master reads. With --daemonset, also watch the "
        "agent DaemonSet and write --removal-notice when it is deleted, so that the agent "
        "switches its node off (kubectl delete -f). Standard library only.",
    )
    lease.set_defaults(run=_report_lease)
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
    add_log_level(lease)


def _report_lease(args: argparse.Namespace) -> int:
    from overlay_vici.reporter.lease import ApiServer, LeaseReporter, run_reporter

    log.setup(args.log_level)
    api = (
        ApiServer(args.server, args.token_file, args.ca_file)
        if args.server
        else ApiServer.in_cluster()
    )
    if (args.daemonset is None) != (args.removal_notice is None):
        raise ValueError("--daemonset and --removal-notice go together; pass both or neither")
    namespace, stop = namespace_of(args), stop_event()
    reporter = LeaseReporter(api, namespace, args.node)
    log.info("lease reporter starting", node=args.node, status=str(args.status))
    if args.daemonset:
        from overlay_vici.reporter.removal import RemovalWatch

        watch = RemovalWatch(api, namespace, args.daemonset, args.removal_notice, args.node)
        threading.Thread(target=watch.run, args=(stop,), daemon=True).start()
    run_reporter(reporter, args.status, stop, heartbeat=args.heartbeat)
    return 0
