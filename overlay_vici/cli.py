"""overlay-vici command line: the agent, previews of what it loads, and the MTU helper."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from overlay_vici import log
from overlay_vici.keyring import KeyringError
from overlay_vici.mtu import ipip_mtu
from overlay_vici.render import Settings, SettingsError


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
    agent.add_argument("--node", required=True, help="this node's name, as in the keyring")
    agent.add_argument(
        "--keys",
        required=True,
        type=Path,
        metavar="DIR",
        help="directory of the mounted key Secret (holds keyring.json)",
    )
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
    agent.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
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
        help="largest safe IPIP (tunl0) MTU for an external MTU",
        description="Print the largest tunl0 MTU whose IPIP packets still fit the external "
        "MTU once wrapped in ESP (AES-GCM-128, transport mode).",
    )
    mtu.add_argument("external_mtu", type=int, metavar="EXTMTU")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except (SettingsError, KeyringError, LookupError, ValueError) as exc:
        print(f"overlay-vici: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "mtu":
        print(ipip_mtu(args.external_mtu))
        return 0
    if args.command == "render":
        return _render(args)
    return _agent(args)


def _render(args: argparse.Namespace) -> int:
    from overlay_vici.render import strongswan_conf, swanctl_conf

    if args.target == "strongswan":
        print(strongswan_conf(args.vici_socket, args.log_file, args.templates), end="")
        return 0
    from overlay_vici.files import read_keyring

    keyring = read_keyring(args.keys)
    print(swanctl_conf(keyring, args.node, _settings(args), args.templates), end="")
    return 0


def _agent(args: argparse.Namespace) -> int:
    from overlay_vici.agent import Agent, AgentConfig
    from overlay_vici.charon import Charon

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
    )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    log.info("agent starting", node=args.node, keys=str(args.keys), vici=args.vici)
    Agent(config, Charon(args.vici)).run(stop)
    log.info("agent stopped", node=args.node)
    return 0
