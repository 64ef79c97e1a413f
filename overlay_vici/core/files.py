"""File edges every process uses: atomic writes, JSON reports and notices, and the
kubelet layout of a mounted Secret (written by the local master and the tests).

Standard library only: report-lease imports it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


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
