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
from collections.abc import Iterator, Sequence

import pytest

from overlay_vici import netfilter
from overlay_vici.netfilter import Guard, GuardError, detect_backend

pytestmark = pytest.mark.skipif(
    not (os.geteuid() == 0 and shutil.which("ip") and shutil.which("iptables-legacy-save")),
    reason="needs root, iproute2 and iptables (a private network namespace per test)",
)

PEERS = {("n1", "10.99.0.1"), ("n2", "10.99.0.2"), ("n3", "10.99.0.3")}


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
def test_ensure_installs_once_then_follows_peer_changes(netns: str, backend: str) -> None:
    run = InNamespace(netns)
    guard = Guard("n1", backend, run)
    assert guard.ensure(PEERS) is True
    saved = run.save(backend)
    assert "-A OUTPUT -p ipencap -j OVERLAY-VICI-GUARD-OUT" in saved
    assert "-A INPUT -p ipencap -j OVERLAY-VICI-GUARD-IN" in saved
    assert saved.count("--pol none") == 4  # n2 and n3, each way; n1 is this node
    assert guard.ensure(PEERS) is False  # unchanged: not even read again
    # A new agent (restart) finds the guard whole and leaves it alone.
    again = Guard("n1", backend, run)
    assert again.ensure(PEERS) is False and len(run.restores) == 1
    # A peer moves to a new address: one restore, still a single jump each way.
    moved = (PEERS - {("n3", "10.99.0.3")}) | {("n3", "10.99.0.13")}
    assert again.ensure(moved) is True
    saved = run.save(backend)
    assert "10.99.0.13/32" in saved and "10.99.0.3/32" not in saved
    assert saved.count("-j OVERLAY-VICI-GUARD-OUT") == 1
    assert saved.count("-j OVERLAY-VICI-GUARD-IN") == 1
    assert len(run.restores) == 2


@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_a_flushed_guard_is_put_back_on_the_next_check(netns: str, backend: str) -> None:
    run = InNamespace(netns)
    guard = Guard("n1", backend, run)
    guard.ensure(PEERS)
    run([f"iptables-{backend}", "-t", "raw", "-F", "OVERLAY-VICI-GUARD-OUT"], None)
    guard._verified -= netfilter.VERIFY_EVERY  # the periodic check is due
    assert guard.ensure(PEERS) is True
    assert run.save(backend).count("--pol none") == 4


@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_remove_leaves_nothing_and_other_rules_alone(netns: str, backend: str) -> None:
    run = InNamespace(netns)
    run([f"iptables-{backend}", "-t", "raw", "-A", "OUTPUT", "-p", "udp", "-j", "ACCEPT"], None)
    guard = Guard("n1", backend, run)
    guard.ensure(PEERS)
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
        Guard("n1", "legacy", InNamespace(netns)).ensure(PEERS)
    message = str(raised.value)
    assert "install iptables" in message and "--no-guard" in message
    assert message.count(". ") == 0
