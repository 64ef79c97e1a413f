"""overlay-vici command line: the agent, the master, previews of what the agent loads, and
the MTU helper. Each wing registers its own subcommands (overlay_vici.agent.cli,
overlay_vici.master.cli, overlay_vici.reporter.cli); this only puts them together."""

from __future__ import annotations

import argparse
import sys

from overlay_vici.agent import cli as agent_cli
from overlay_vici.core.keyring import KeyringError
from overlay_vici.master import cli as master_cli
from overlay_vici.reporter import cli as reporter_cli

# The edges' one-sentence errors, looked up only once their module was imported (so that
# other commands do not import `kubernetes` for them).
EDGE_ERRORS = (
    ("overlay_vici.agent.netfilter", "GuardError"),
    ("overlay_vici.master.kube", "KubeError"),
    ("overlay_vici.reporter.lease", "LeaseError"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="overlay-vici",
        description="Encrypt Calico IPIP traffic between Kubernetes nodes with IPsec, "
        "driving strongSwan charon over VICI.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for wing in (agent_cli, master_cli, reporter_cli):
        wing.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (KeyringError, LookupError, ValueError, *_edge_errors()) as exc:
        print(f"overlay-vici: {exc}", file=sys.stderr)
        return 2


def _edge_errors() -> tuple[type[Exception], ...]:
    modules = ((sys.modules.get(name), error) for name, error in EDGE_ERRORS)
    return tuple(getattr(module, error) for module, error in modules if module)
