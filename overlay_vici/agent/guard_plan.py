"""Plan the fail-closed guard: netfilter rules that drop every IPIP packet IPsec does not
protect, so that neither a charon that stops (and removes its policies) nor a route that
Calico moves before the keyring follows can let plaintext out.

Catch-all, not per peer: a per-peer rule knows only the addresses in the keyring, and Calico
may route IPIP to a node's new address before the keyring names it (151 plaintext packets
measured, docs/faults.md). So the only addresses IPIP may reach unprotected are those of the
nodes outside the mesh (opted out), which the keyring lists; each has a RETURN before the DROP.

Pure: from those nodes and what `iptables-save` shows, the exact `iptables-restore --noflush`
input. The edge that runs it is overlay_vici/netfilter.py.

Where the rules sit (verified in the UML guest with real charon and SAs, see docs/faults.md):

- outbound in raw OUTPUT: a locally encapsulated IPIP packet has its route, and so its XFRM
  bundle, before the first OUTPUT hook, so `--dir out --pol none` there means exactly "would
  leave unencrypted"; the ESP packet that IPsec makes of it is protocol 50 and passes;
- inbound in mangle INPUT: plaintext IPIP is matched before the IPIP handler takes it, while
  IPIP decrypted from ESP comes back through the hooks with a secpath and passes.

Not filter: Calico's Felix ACCEPTs IPIP to and from its hosts in filter OUTPUT and INPUT
(cali-OUTPUT/cali-INPUT, inserted first), which would end the filter table before any rule of
ours. raw OUTPUT and mangle INPUT hold no such ACCEPT.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, ip_address

IPIP = 4


@dataclass(frozen=True)
class Hook:
    table: str
    builtin: str  # the built-in chain that jumps to ours
    chain: str
    direction: str  # the policy match's --dir
    peer_option: str  # -d for outbound, -s for inbound


OUT = Hook("raw", "OUTPUT", "OVERLAY-VICI-GUARD-OUT", "out", "-d")
IN = Hook("mangle", "INPUT", "OVERLAY-VICI-GUARD-IN", "in", "-s")
HOOKS = (OUT, IN)
COMMENT_PREFIX = "overlay-vici guard"
OUTSIDE_COMMENT = f"{COMMENT_PREFIX}: outside the mesh: "
DROP_COMMENT = f"{COMMENT_PREFIX}: IPIP that IPsec does not protect"
COMMENT_MAX = 255  # what xt_comment holds


@dataclass(frozen=True, order=True)
class GuardPeer:
    ip: IPv4Address
    name: str


def outside_peers(nodes: Iterable[tuple[str, str]]) -> tuple[GuardPeer, ...]:
    """The nodes outside the mesh whose IPIP stays plaintext, sorted by address. Calico's
    IPIP is IPv4 in IPv4, so an IPv6 node address carries no IPIP and needs no rule."""
    result = set()
    for name, ip in nodes:
        address = ip_address(ip)
        if isinstance(address, IPv4Address):
            result.add(GuardPeer(address, name))
    return tuple(sorted(result))


def chain_rules(hook: Hook, outside: Iterable[GuardPeer]) -> list[str]:
    """The chain's rules: IPsec-protected IPIP returns at once (the common case costs one
    rule), then each node outside the mesh returns, then everything else is dropped."""
    rules = [f"-A {hook.chain} -m policy --dir {hook.direction} --pol ipsec -j RETURN"]
    for peer in outside:
        # Node names are DNS-1123 names: nothing in them needs escaping inside the quotes.
        # xt_comment holds 255 characters; a node name may have 253.
        comment = f"{OUTSIDE_COMMENT}{peer.name}"[:COMMENT_MAX]
        rules.append(
            f"-A {hook.chain} {hook.peer_option} {peer.ip}/32 "
            f'-m comment --comment "{comment}" -j RETURN'
        )
    rules.append(
        f"-A {hook.chain} -p {IPIP} -m policy --dir {hook.direction} --pol none "
        f'-m comment --comment "{DROP_COMMENT}" -j DROP'
    )
    return rules


def jump_rule(hook: Hook) -> str:
    return f"-I {hook.builtin} 1 -p {IPIP} -j {hook.chain}"


def _jumps(saved: str, hook: Hook) -> int:
    """How many rules of the built-in chain jump to ours (iptables-save output of the table)."""
    pattern = rf"^-A {hook.builtin} .*-j {re.escape(hook.chain)}\s*$"
    return len(re.findall(pattern, saved, re.M))


def _chain_exists(saved: str, hook: Hook) -> bool:
    return re.search(rf"^:{re.escape(hook.chain)} ", saved, re.M) is not None


def installed_outside(saved: dict[str, str]) -> tuple[GuardPeer, ...] | None:
    """The allow-list of the installed guard (nodes outside the mesh, sorted), if the guard is
    whole in both tables: chains, jumps, the IPsec RETURN first, the catch-all DROP last, only
    allow rules between, and the same allow-list both ways; None if any part is missing."""
    found: list[tuple[GuardPeer, ...]] = []
    for hook in HOOKS:
        text = saved.get(hook.table, "")
        if not _chain_exists(text, hook) or _jumps(text, hook) == 0:
            return None
        lines = re.findall(rf"^-A {re.escape(hook.chain)} (.*)$", text, re.M)
        # iptables-save names protocol 4 "ipencap" where /etc/protocols has it.
        catch_all = (
            rf"-p (?:{IPIP}|ipencap) -m policy --dir {hook.direction} --pol none "
            rf'-m comment --comment "{re.escape(DROP_COMMENT)}" -j DROP'
        )
        if (
            len(lines) < 2
            or lines[0] != f"-m policy --dir {hook.direction} --pol ipsec -j RETURN"
            or re.fullmatch(catch_all, lines[-1]) is None
        ):
            return None
        allowed = []
        for line in lines[1:-1]:
            match = re.fullmatch(
                rf"{re.escape(hook.peer_option)} (\d+\.\d+\.\d+\.\d+)/32 -m comment "
                rf'--comment "{re.escape(OUTSIDE_COMMENT)}([^"\s]+)" -j RETURN',
                line,
            )
            if match is None:
                return None
            allowed.append(GuardPeer(IPv4Address(match[1]), match[2]))
        found.append(tuple(sorted(allowed)))
    return found[0] if all(f == found[0] for f in found) else None


def install_script(outside: Iterable[GuardPeer], saved: dict[str, str]) -> str:
    """iptables-restore --noflush input that makes the guard drop all unprotected IPIP but
    that of the nodes `outside` the mesh.

    Declaring a user chain under --noflush flushes it, and each table's COMMIT replaces the
    table in one step: the chain never exists half-filled. The jump is added only where
    missing (a restore cannot test for a rule), so running this twice changes nothing.
    """
    outside = tuple(outside)
    out = []
    for hook in HOOKS:
        out.append(f"*{hook.table}")
        out.append(f":{hook.chain} - [0:0]")
        out.extend(chain_rules(hook, outside))
        if _jumps(saved.get(hook.table, ""), hook) == 0:
            out.append(jump_rule(hook))
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def emptying_script() -> str:
    """iptables-restore --noflush input that empties the guard's chains (declaring a chain
    flushes it), with no save to read first: the one step that stops the drops, for the
    disable, where every process spawned delays it. The jumps then lead to empty chains
    until removal_script's restore removes them and the chains."""
    return "".join(f"*{hook.table}\n:{hook.chain} - [0:0]\nCOMMIT\n" for hook in HOOKS)


def removal_script(saved: dict[str, str]) -> str | None:
    """iptables-restore --noflush input that removes every jump to the guard and its chains;
    None if nothing of it is installed. Only the disable (the switch, or an operator's
    `overlay-vici guard remove`) runs this: with encryption on, removing it fails open."""
    out = []
    for hook in HOOKS:
        text = saved.get(hook.table, "")
        jumps = re.findall(rf"^-A ({hook.builtin} .*-j {re.escape(hook.chain)})\s*$", text, re.M)
        if not jumps and not _chain_exists(text, hook):
            continue
        out.append(f"*{hook.table}")
        out.extend(f"-D {rule}" for rule in jumps)
        if _chain_exists(text, hook):
            out.append(f"-F {hook.chain}")
            out.append(f"-X {hook.chain}")
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else None


def choose_backend(setting: str | None, legacy_save: str, nft_save: str) -> str:
    """legacy or nft, the way Calico's Felix picks it: FELIX_IPTABLESBACKEND if it names one,
    else the backend that already holds rules (legacy once it has 10, or at least as many as
    nft), so that the guard lives beside Calico's and kube-proxy's rules."""
    if setting and setting.strip().lower() in ("legacy", "nft"):
        return setting.strip().lower()
    legacy, nft = _count_rules(legacy_save), _count_rules(nft_save)
    return "legacy" if legacy >= 10 or legacy >= nft else "nft"


def _count_rules(saved: str) -> int:
    return sum(1 for line in saved.splitlines() if line.startswith("-"))
