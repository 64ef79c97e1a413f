"""The guard's edge: run iptables-save / iptables-restore for the backend the host uses.

The rules themselves are planned in overlay_vici/guard_plan.py. The guard is kernel state: it
outlives the agent and charon, and only the switch off (or an operator's
`overlay-vici guard remove`) takes it away.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence

from overlay_vici.agent.guard_plan import (
    HOOKS,
    GuardPeer,
    choose_backend,
    emptying_script,
    install_script,
    installed_outside,
    outside_peers,
    removal_script,
)
from overlay_vici.core import log

BACKEND_ENV = "FELIX_IPTABLESBACKEND"  # Calico's own setting, honoured the same way
VERIFY_EVERY = 30.0  # seconds between checks that nobody flushed the guard
TIMEOUT = 30.0
WAIT_FOR_LOCK = "10"  # seconds iptables-restore waits for the xtables lock

Runner = Callable[[Sequence[str], str | None], subprocess.CompletedProcess[str]]


class GuardError(RuntimeError):
    """The guard cannot be read or written; one sentence naming the fix."""


def _run(cmd: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(cmd), input=stdin, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def _binary(backend: str, tool: str) -> str | None:
    """iptables-<backend>-<tool>, else plain iptables-<tool> (as Felix falls back)."""
    return shutil.which(f"iptables-{backend}-{tool}") or shutil.which(f"iptables-{tool}")


def detect_backend(setting: str | None = None, run: Runner = _run) -> str:
    """legacy or nft: the setting if it names one, else the backend holding the host's rules."""
    setting = setting if setting is not None else os.environ.get(BACKEND_ENV)
    if setting and setting.strip().lower() in ("legacy", "nft"):
        return setting.strip().lower()
    saved = {}
    for backend in ("legacy", "nft"):
        binary = shutil.which(f"iptables-{backend}-save")
        saved[backend] = run([binary], None).stdout if binary else ""
    return choose_backend(None, saved["legacy"], saved["nft"])


class Guard:
    """Keeps the guard dropping all unprotected IPIP but that of the nodes outside the mesh;
    cheap when nothing changed."""

    def __init__(self, node: str, backend: str | None = None, run: Runner = _run) -> None:
        self.node = node
        self._setting = backend
        self._run = run
        self.backend: str | None = None
        # The installed allow-list (nodes outside the mesh), once known.
        self.outside: tuple[GuardPeer, ...] | None = None
        self._verified = -VERIFY_EVERY

    def ensure(self, outside: Iterable[tuple[str, str]]) -> bool:
        """Make the guard drop all unprotected IPIP except to and from these (name, IP) nodes
        outside the mesh (often none).

        Returns whether iptables was written. Re-reads the tables every VERIFY_EVERY seconds
        (or when the list changes) and rewrites them only if they differ.
        """
        wanted = outside_peers(outside)
        now = time.monotonic()
        if wanted == self.outside and now - self._verified < VERIFY_EVERY:
            return False
        saved = self._save()
        written = installed_outside(saved) != wanted
        if written:
            self._restore(install_script(wanted, saved))
            log.info(
                "guard installed",
                node=self.node,
                backend=self.backend,
                outside=len(wanted),
                was=None if self.outside is None else len(self.outside),
            )
        self.outside, self._verified = wanted, now
        return written

    def installed(self) -> tuple[tuple[GuardPeer, ...] | None, bool]:
        """What the kernel holds now: the allow-list if the guard is whole (else None), and
        whether any part of it is there (a partial guard may still drop IPIP)."""
        saved = self._save()
        return installed_outside(saved), removal_script(saved) is not None

    def stop_dropping(self) -> None:
        """Empty the chains of a guard this object installed: one restore and no save, so
        that the disable stops the drops before the SAs go; remove() takes the rest."""
        if self.outside is not None:
            self._restore(emptying_script())

    def remove(self) -> bool:
        """Remove the guard (the disable only); returns whether anything was there."""
        script = removal_script(self._save())
        if script is not None:
            self._restore(script)
            log.warning("guard removed", node=self.node, backend=self.backend)
        self.outside = None
        return script is not None

    def _tools(self) -> tuple[str, str]:
        if self.backend is None:
            self.backend = detect_backend(self._setting, self._run)
        save, restore = _binary(self.backend, "save"), _binary(self.backend, "restore")
        if save is None or restore is None:
            raise GuardError(
                f"iptables-{self.backend}-save/-restore not found; install iptables in the "
                "agent's image, or run the agent with --no-guard (charon stopping then lets "
                "IPIP out unencrypted)"
            )
        return save, restore

    def _save(self) -> dict[str, str]:
        save, _ = self._tools()
        saved = {}
        for table in sorted({hook.table for hook in HOOKS}):
            result = self._run([save, "-t", table], None)
            if result.returncode != 0:
                raise GuardError(
                    f"{save} -t {table} failed ({_first_line(result.stderr)}); the agent needs "
                    "CAP_NET_ADMIN in the host network namespace and the iptables modules "
                    f"iptable_{table} and xt_policy"
                )
            saved[table] = result.stdout
        return saved

    def _restore(self, script: str) -> None:
        _, restore = self._tools()
        result = self._run([restore, "--noflush", "-w", WAIT_FOR_LOCK], script)
        if result.returncode != 0:
            raise GuardError(
                f"{restore} refused the guard ({_first_line(result.stderr)}); check that the "
                "kernel has xt_policy and xt_comment, and CAP_NET_ADMIN"
            )


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else "no message"
