"""One real strongSwan charon for a test or a benchmark, reachable over its own VICI socket.

Shared by tests/test_agent_host.py and bench/bench_reconcile.py. As root, charon runs in
private mount and network namespaces (its pid file is hard-coded to /var/run/charon.pid,
and its trap policies then stay out of the host's XFRM tables).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import vici

from overlay_vici.agent.render import strongswan_conf

CHARON = "/usr/lib/ipsec/charon"


@dataclass
class CharonProcess:
    """One charon in `dir`: strongswan.conf as `overlay-vici render strongswan` prints it
    (plus `extra_conf`), its log in charon.log, its output in `stdout` (None: discarded)."""

    dir: Path
    binary: str = CHARON
    isolate: bool = True  # private mount and network namespaces (needs root and unshare)
    extra_conf: str = ""
    stdout: Path | None = None
    session_timeout: float = 10.0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.dir / "charon.vici"

    @property
    def uri(self) -> str:
        return f"unix://{self.socket}"

    @property
    def log_path(self) -> Path:
        return self.dir / "charon.log"

    def start(self, timeout: float = 15.0) -> None:
        conf = self.dir / "strongswan.conf"
        conf.write_text(strongswan_conf(str(self.socket), str(self.log_path)) + self.extra_conf)
        command = [self.binary]
        if self.isolate:
            command = ["unshare", "--mount", "--net", "--fork", "--kill-child=SIGKILL", "sh", "-c",
                       f'mount -t tmpfs tmpfs /run && exec "{self.binary}"']  # fmt: skip
        output = self.stdout.open("wb") if self.stdout else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            command,
            env={**os.environ, "STRONGSWAN_CONF": str(conf)},
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT if self.stdout else subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise RuntimeError(f"charon exited with {code}; see {self.log_path}")
            try:
                with self.session() as session:
                    session.request("version")
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"charon's VICI socket {self.socket} did not come up in {timeout} s")

    def kill(self) -> None:
        """SIGKILL charon's process group, then wait until its socket refuses connections.

        unshare may exit a moment before charon has died, and until then the kernel still
        queues connections on charon's listening socket.
        """
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(str(self.socket))
            except (ConnectionRefusedError, FileNotFoundError):
                return
            finally:
                probe.close()
            time.sleep(0.02)
        raise RuntimeError("charon's VICI socket still accepts connections after SIGKILL")

    def stop(self) -> None:
        """SIGTERM the process group this started (SIGKILL after 10 s)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    @contextmanager
    def session(self) -> Iterator[vici.Session]:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(self.session_timeout)
        try:
            sock.connect(str(self.socket))
            yield vici.Session(sock)
        finally:
            sock.close()

    def state(self) -> tuple[set[str], set[str]]:
        """charon's loaded connection names and shared key ids, over our own session."""
        with self.session() as session:
            conns = {c.decode() for c in session.request("get-conns")["conns"]}
            keys = {k.decode() for k in session.request("get-shared")["keys"]}
        return conns, keys

    def conn_details(self, name: str) -> dict[str, Any]:
        with self.session() as session:
            for conn in session.list_conns({"ike": name}):
                if name in conn:
                    return conn[name]
        raise KeyError(name)
