"""The guard's edge against the real iptables (legacy and nft) in a private network namespace.

The host kernel has x_tables, xt_policy and nf_tables for IPv4 in a fresh namespace, so both
backends are exercised here; the UML guest, whose kernel lacks nf_tables for ip, runs legacy
only (tests/uml/test_faults.py shows the guard on the wire).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence

import pytest

from overlay_vici.agent import netfilter
from overlay_vici.agent.guard_plan import IN, emptying_script
from overlay_vici.agent.netfilter import Guard, GuardError, detect_backend

pytestmark = pytest.mark.skipif(
    not (os.geteuid() == 0 and shutil.which("ip") and shutil.which("iptables-legacy-save")),
    reason="needs root, iproute2 and iptables (a private network namespace per test)",
)

OUTSIDE = {("n5", "10.99.0.5"), ("n6", "10.99.0.6")}


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"ovv-test-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


class InNamespace:
    """A Runner that runs each command inside the namespace, counting restores."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.restores: list[str] = []

    def __call__(self, cmd: Sequence[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
        if "restore" in cmd[0]:
            self.restores.append(stdin or "")
        return subprocess.run(
            ["ip", "netns", "exec", self.netns, *cmd],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def save(self, backend: str) -> str:
        return self([f"iptables-{backend}-save"], None).stdout


@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_ensure_installs_once_then_follows_the_nodes_outside(netns: str, backend: str) -> None:
    run = InNamespace(netns)
    guard = Guard("n1", backend, run)
    assert guard.ensure(OUTSIDE) is True
    saved = run.save(backend)
    assert "-A OUTPUT -p ipencap -j OVERLAY-VICI-GUARD-OUT" in saved
    assert "-A INPUT -p ipencap -j OVERLAY-VICI-GUARD-IN" in saved
    assert saved.count("--pol none") == 2  # one catch-all DROP each way
    assert saved.count("outside the mesh: n5") == saved.count("outside the mesh: n6") == 2
    assert guard.ensure(OUTSIDE) is False  # unchanged: not even read again
    # A new agent (restart) finds the guard whole and leaves it alone.
    again = Guard("n1", backend, run)
    assert again.ensure(OUTSIDE) is False and len(run.restores) == 1
    assert again.outside == guard.outside
    # An outside node moves to a new address: one restore, still a single jump each way.
    moved = (OUTSIDE - {("n6", "10.99.0.6")}) | {("n6", "10.99.0.16")}
    assert again.ensure(moved) is True
    saved = run.save(backend)
    assert "10.99.0.16/32" in saved and "10.99.0.6/32" not in saved
    assert saved.count("-j OVERLAY-VICI-GUARD-OUT") == 1
    assert saved.count("-j OVERLAY-VICI-GUARD-IN") == 1
    # The last one joins the mesh: only the catch-all is left.
    assert again.ensure([]) is True and again.outside == ()
    saved = run.save(backend)
    assert "outside the mesh" not in saved and saved.count("--pol none") == 2
    assert len(run.restores) == 3


@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_installed_reports_whole_partial_and_absent(netns: str, backend: str) -> None:
    run = InNamespace(netns)
    guard = Guard("n1", backend, run)
    assert guard.installed() == (None, False)
    guard.ensure(OUTSIDE)
    outside, present = guard.installed()
    assert present and outside == guard.outside and [p.name for p in outside] == ["n5", "n6"]
    run([f"iptables-{backend}", "-t", "mangle", "-D", "INPUT", "-p", "4", "-j", IN.chain], None)
    assert guard.installed() == (None, True)


# Sends a bare IPv4 header with protocol 4 per SRC>DST argument from a raw socket (no ipip
# module needed) and prints its fate: dropped-out (sendto's EPERM: raw OUTPUT dropped it),
# delivered (a protocol-4 raw socket got it), or dropped-in (it left but never arrived).
PROBE = """
import socket, struct, sys
receiver = socket.socket(socket.AF_INET, socket.SOCK_RAW, 4)
receiver.settimeout(0.3)
sender = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for pair in sys.argv[1:]:
    src, dst = pair.split(">")
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20, 0, 0, 64, 4, 0, socket.inet_aton(src), socket.inet_aton(dst)
    )
    try:
        sender.sendto(header, (dst, 0))
    except PermissionError:
        print("dropped-out")
        continue
    try:
        receiver.recv(100)
        print("delivered")
    except TimeoutError:
        print("dropped-in")
"""


@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_the_kernel_drops_unprotected_ipip_but_that_of_nodes_outside(
    netns: str, backend: str
) -> None:
    """No SA exists here, so all IPIP is unprotected. The namespace owns 10.99.0.0/24 on lo,
    so each packet passes the outbound chain (-d) and then the inbound one (-s)."""
    run = InNamespace(netns)
    run(["ip", "link", "set", "lo", "up"], None)
    run(["ip", "addr", "add", "10.99.0.1/24", "dev", "lo"], None)
    Guard("n1", backend, run).ensure(OUTSIDE)
    fates = {
        "10.99.0.1>10.99.0.7": "dropped-out",  # to a node not outside the mesh
        "10.99.0.7>10.99.0.5": "dropped-in",  # to n5 (outside) it leaves; from .7 it is dropped
        "10.99.0.6>10.99.0.5": "delivered",  # n6 to n5: both outside the mesh
    }
    seen = run([sys.executable, "-c", PROBE, *fates], None).stdout.split()
    assert dict(zip(fates, seen, strict=True)) == fates


@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_stop_dropping_empties_the_chains_in_one_restore_and_the_drops_stop(
    netns: str, backend: str
) -> None:
    """The disable's first step: one restore (the emptying script, no save), after which the
    kernel delivers the IPIP the guard dropped; remove() then takes jumps and chains."""
    run = InNamespace(netns)
    run(["ip", "link", "set", "lo", "up"], None)
    run(["ip", "addr", "add", "10.99.0.1/24", "dev", "lo"], None)
    guard = Guard("n1", backend, run)
    Guard("n1", backend, run).stop_dropping()  # knows of no guard: touches nothing
    assert run.restores == []
    guard.ensure(OUTSIDE)
    run.restores.clear()
    guard.stop_dropping()
    assert run.restores == [emptying_script()]
    saved = run.save(backend)
    assert "-j OVERLAY-VICI-GUARD-OUT" in saved and "--pol none" not in saved
    probe = run([sys.executable, "-c", PROBE, "10.99.0.1>10.99.0.7"], None).stdout.split()
    assert probe == ["delivered"]
    assert guard.remove() is True
    assert "OVERLAY-VICI" not in run.save(backend)


@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_a_flushed_guard_is_put_back_on_the_next_check(netns: str, backend: str) -> None:
    run = InNamespace(netns)
    guard = Guard("n1", backend, run)
    guard.ensure(OUTSIDE)
    run([f"iptables-{backend}", "-t", "raw", "-F", "OVERLAY-VICI-GUARD-OUT"], None)
    guard._verified -= netfilter.VERIFY_EVERY  # the periodic check is due
    assert guard.ensure(OUTSIDE) is True
    assert run.save(backend).count("--pol none") == 2


@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_remove_leaves_nothing_and_other_rules_alone(netns: str, backend: str) -> None:
    run = InNamespace(netns)
    run([f"iptables-{backend}", "-t", "raw", "-A", "OUTPUT", "-p", "udp", "-j", "ACCEPT"], None)
    guard = Guard("n1", backend, run)
    guard.ensure(OUTSIDE)
    assert guard.remove() is True
    saved = run.save(backend)
    assert "OVERLAY-VICI" not in saved
    assert "-A OUTPUT -p udp -j ACCEPT" in saved
    assert guard.remove() is False


def test_backend_follows_felix_setting_else_the_rules_present(
    netns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = InNamespace(netns)
    monkeypatch.delenv(netfilter.BACKEND_ENV, raising=False)
    assert detect_backend(None, run) == "legacy"  # nothing anywhere: legacy, like Felix
    for i in range(3):
        run(["iptables-nft", "-A", "INPUT", "-p", "udp", "--dport", str(1000 + i)], None)
    assert detect_backend(None, run) == "nft"
    monkeypatch.setenv(netfilter.BACKEND_ENV, "Legacy")
    assert detect_backend(None, run) == "legacy"


def test_missing_iptables_is_one_sentence_naming_the_fix(
    netns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(netfilter.shutil, "which", lambda _: None)
    with pytest.raises(GuardError) as raised:
        Guard("n1", "legacy", InNamespace(netns)).ensure(OUTSIDE)
    message = str(raised.value)
    assert "install iptables" in message and "--no-guard" in message
    assert message.count(". ") == 0
