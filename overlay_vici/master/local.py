"""Local mode's edges: files in one state directory instead of the Kubernetes API.

    STATE/_master/secret/      the Secret (keyring.json, master.json), kubelet's ..data layout
    STATE/_master/rotate-request   an on-demand request (`overlay-vici rotate --local STATE`)
    STATE/_master/enabled      the encryption switch, true or false (`overlay-vici encryption`);
                               missing: the keyring's stays
    STATE/_master/lock         held (flock) by the running master: one per state directory
    STATE/<node>/secret/       each node's copy of the Secret, as kubelet would mount it
    STATE/<node>/status.json   the node's agent's status report (its acknowledgement)

`_master` cannot clash with a node: a Kubernetes node name has no underscore.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from overlay_vici.core import log
from overlay_vici.core.contract import KEYRING_FILE, MASTER_FILE, AgentReport
from overlay_vici.core.files import publish_secret, read_json, write_atomic
from overlay_vici.master.master import Snapshot, SwitchFile
from overlay_vici.master.rotation import NodeInfo

MASTER_DIR = "_master"
REQUEST_FILE = "rotate-request"
ENABLED_FILE = "enabled"


class NodesFileError(ValueError):
    """The node list cannot be used; one sentence."""


def master_dir(state: Path) -> Path:
    return state / MASTER_DIR


def secret_dir(state: Path) -> Path:
    return master_dir(state) / "secret"


def node_secret_dir(state: Path, node: str) -> Path:
    return state / node / "secret"


def node_status_path(state: Path, node: str) -> Path:
    return state / node / "status.json"


def parse_nodes(text: str, source: str = "NODES") -> list[NodeInfo]:
    """A YAML or JSON list of {name, ip[, opt_out]}."""
    try:
        doc: Any = json.loads(text)
    except ValueError:
        try:
            import yaml
        except ImportError:
            raise NodesFileError(
                f"{source} is not JSON and PyYAML is not installed "
                "(pip install overlay-vici[master])"
            ) from None
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise NodesFileError(f"{source} is neither valid JSON nor YAML{where}") from None
    if not isinstance(doc, list):
        raise NodesFileError(f"{source} must be a list of {{name, ip}} objects")
    nodes: list[NodeInfo] = []
    for item in doc:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise NodesFileError(f"every entry of {source} must be an object with a 'name'")
        ip = item.get("ip")
        if ip is not None and not isinstance(ip, str):
            raise NodesFileError(f"node {item['name']} in {source} has a non-string ip {ip!r}")
        nodes.append(NodeInfo(item["name"], ip, bool(item.get("opt_out", False))))
    names = [n.name for n in nodes]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise NodesFileError(f"node {duplicate} appears twice in {source}")
    return nodes


def read_nodes(path: Path) -> list[NodeInfo]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise NodesFileError(f"cannot read the node list {path} ({exc.strerror})") from None
    return parse_nodes(text, str(path))


def request_rotation(state: Path) -> str:
    """Leave an on-demand request for the local master; returns its token."""
    token = f"{time.time():.6f}-{secrets.token_hex(4)}"
    _leave(state, REQUEST_FILE, token)
    return token


def set_encryption(state: Path, enabled: bool) -> None:
    """Set the switch the local master follows (it may start later: the first keyring is
    then created with it)."""
    _leave(state, ENABLED_FILE, "true" if enabled else "false")


def _leave(state: Path, name: str, text: str) -> None:
    """Write a file for the local master, atomically: it reads it at every step."""
    if not state.is_dir():
        raise NodesFileError(
            f"no local master state at {state}; start `overlay-vici master --local {state}` first"
        )
    write_atomic(master_dir(state) / name, text + "\n", 0o644)


def read_snapshot(state: Path) -> Snapshot:
    directory = secret_dir(state)
    data = directory / "..data"
    version = os.readlink(data) if data.is_symlink() else None
    return Snapshot(
        keyring=_read_text(directory / KEYRING_FILE),
        master=_read_text(directory / MASTER_FILE),
        request=(_read_text(master_dir(state) / REQUEST_FILE) or "").strip() or None,
        version=version,
    )


def read_reports(state: Path, names: list[str]) -> dict[str, AgentReport]:
    reports: dict[str, AgentReport] = {}
    for name in names:
        doc = read_json(node_status_path(state, name))
        report = AgentReport.from_status(doc, name) if doc else None
        if report is not None and report.node == name:
            reports[name] = report
    return reports


class LocalStore:
    """The Store of overlay_vici.master.master over files; see the module's layout."""

    def __init__(self, state: Path, nodes_file: Path) -> None:
        self.state = state
        self.nodes_file = nodes_file
        self._lock: int | None = None
        self._nodes: list[NodeInfo] | None = None
        self._nodes_stamp: tuple[int, int] | None = None
        self._nodes_error: str | None = None
        self._synced: str | None = None
        self._switch = SwitchFile(master_dir(state) / ENABLED_FILE)
        self.conflicts: Counter[str] = Counter()  # writes refused: the Secret changed

    def is_leader(self, now: float) -> bool:
        """The flock on STATE/_master/lock: a second local master on the same STATE stands by."""
        if self._lock is None:
            master_dir(self.state).mkdir(parents=True, exist_ok=True)
            fd = os.open(master_dir(self.state) / "lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            self._lock = fd
        return True

    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def read(self) -> Snapshot:
        snapshot = read_snapshot(self.state)
        if snapshot.version is not None and snapshot.version != self._synced:
            self._copy_to_nodes(snapshot)
        return snapshot

    def write(self, keyring: str, master: str, version: Any) -> bool:
        data = secret_dir(self.state) / "..data"
        current = os.readlink(data) if data.is_symlink() else None
        if current != version:
            self.conflicts["secret"] += 1
            return False
        publish_secret(secret_dir(self.state), {KEYRING_FILE: keyring, MASTER_FILE: master})
        self._copy_to_nodes(read_snapshot(self.state))
        return True

    def nodes(self) -> list[NodeInfo] | None:
        """The node list file, re-read when it changes; on an error the last good list stays."""
        try:
            st = self.nodes_file.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if stamp is not None and stamp == self._nodes_stamp:
            return self._nodes
        try:
            self._nodes = read_nodes(self.nodes_file)
            self._nodes_error = None
            self._nodes_stamp = stamp
        except NodesFileError as exc:
            if str(exc) != self._nodes_error:
                log.error("node list rejected, keeping the last good one", error=str(exc))
            self._nodes_error = str(exc)
        return self._nodes

    def reports(self) -> Mapping[str, AgentReport]:
        names = {n.name for n in self._nodes or ()}
        return read_reports(self.state, sorted(names))

    def desired(self) -> bool | None:
        return self._switch()

    def _copy_to_nodes(self, snapshot: Snapshot) -> None:
        """Give every peer's node directory the Secret's current files, as kubelet would."""
        if snapshot.keyring is None:
            return
        try:
            peers = [p["name"] for p in json.loads(snapshot.keyring).get("peers", [])]
        except (ValueError, AttributeError, TypeError, KeyError):
            return
        files = {KEYRING_FILE: snapshot.keyring}
        if snapshot.master is not None:
            files[MASTER_FILE] = snapshot.master
        for name in peers:
            target = node_secret_dir(self.state, name)
            if (
                _read_text(target / KEYRING_FILE) != snapshot.keyring
                or _read_text(target / MASTER_FILE) != snapshot.master
            ):
                publish_secret(target, files)
        self._synced = snapshot.version


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None
