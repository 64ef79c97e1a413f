"""Structured logs: one JSON object per line, one line per event.

Callers pass names and ids, never key material: nothing here inspects values.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_logger = logging.getLogger("overlay_vici")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        return json.dumps(entry, default=str)


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    _logger.handlers[:] = [handler]
    _logger.setLevel(level.upper())
    _logger.propagate = False


def debug(event: str, **fields: Any) -> None:
    _logger.debug(event, extra={"fields": fields})


def info(event: str, **fields: Any) -> None:
    _logger.info(event, extra={"fields": fields})


def warning(event: str, **fields: Any) -> None:
    _logger.warning(event, extra={"fields": fields})


def error(event: str, **fields: Any) -> None:
    _logger.error(event, extra={"fields": fields})
