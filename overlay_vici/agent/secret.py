"""The key Secret as the agent reads it: mounted by kubelet, which swaps a `..data`
symlink on every update (overlay_vici.core.files.publish_secret writes the same layout)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from overlay_vici.core.contract import KEYRING_FILE
from overlay_vici.core.keyring import MAX_KEYRING_BYTES, Keyring, KeyringError, loads, too_large


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
