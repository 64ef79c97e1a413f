"""File edges: the mounted key Secret, the rendered config and the status report."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from overlay_vici.core.keyring import MAX_KEYRING_BYTES, Keyring, KeyringError, loads, too_large

KEYRING_FILE = "keyring.json"


def read_keyring(secret_dir: Path) -> Keyring:
    return loads(read_keyring_bytes(secret_dir))


def read_keyring_bytes(secret_dir: Path) -> bytes:
    """Read through kubelet's `..data` symlink; never more than the size limit."""
    path = secret_dir / KEYRING_FILE
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_KEYRING_BYTES + 1)
            if len(data) > MAX_KEYRING_BYTES:
                raise too_large(os.fstat(handle.fileno()).st_size)
    except FileNotFoundError:
        raise KeyringError(
            f"no {KEYRING_FILE} in {secret_dir}; check the Secret volume and that the master runs"
        ) from None
    except OSError as exc:
        raise KeyringError(f"cannot read {path} ({exc.strerror}); check the volume mount") from None
    return data


def write_atomic(path: Path, text: str, mode: int) -> None:
    """Readers see the old or the new file, never half; `mode` is set before any byte."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, doc: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(doc, indent=1, sort_keys=True) + "\n", 0o644)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


class _Wake(FileSystemEventHandler):
    def __init__(self, event: threading.Event) -> None:
        self._event = event

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in ("opened", "closed_no_write"):
            self._event.set()


class SecretWatcher:
    """Sets `changed` whenever anything in the Secret directory moves.

    kubelet swaps the `..data` symlink by rename; watching the directory itself (not the
    file, whose inode changes) catches that. The agent re-reads and compares, so spurious
    wake-ups cost one read.
    """

    def __init__(self, secret_dir: Path) -> None:
        self.changed = threading.Event()
        self._observer = Observer()
        secret_dir.mkdir(parents=True, exist_ok=True)
        self._observer.schedule(_Wake(self.changed), str(secret_dir), recursive=False)

    def __enter__(self) -> SecretWatcher:
        self._observer.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._observer.stop()
        self._observer.join(timeout=5)


def publish_secret(secret_dir: Path, files: dict[str, str]) -> None:
    """Write files the way kubelet updates a mounted Secret, so readers never see half.

    Layout: `..<stamp>/` holds the files, `..data` points at it, and each visible name
    is a symlink through `..data`; an update swaps `..data` with one rename.
    """
    secret_dir.mkdir(parents=True, exist_ok=True)
    stamp = Path(tempfile.mkdtemp(dir=secret_dir, prefix="..", suffix=".d"))
    os.chmod(stamp, 0o755)
    for name, text in files.items():
        write_atomic(stamp / name, text, 0o600)
    data, staging = secret_dir / "..data", secret_dir / "..data_tmp"
    old = os.readlink(data) if data.is_symlink() else None
    staging.unlink(missing_ok=True)
    staging.symlink_to(stamp.name)
    os.replace(staging, data)
    for name in files:
        link = secret_dir / name
        if not link.is_symlink():
            link.symlink_to(Path("..data") / name)
    if old:
        shutil.rmtree(secret_dir / old, ignore_errors=True)
