"""Turn swanctl.conf syntax into the VICI messages swanctl itself would send.

Pure. Mirrors swanctl 5.9.8 (load_conns.c, load_creds.c): a connection section becomes
one `load-conn` message, its keys before its subsections, list-valued keys split on
commas; an `ike`/`eap`/... secret section becomes one `load-shared` message whose id is
the section name, whose data is decoded from 0x (hex) / 0s (base64), and whose owners
are the values of its `id*` keys in file order.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any

Section = dict[str, Any]

LIST_KEYS = frozenset(
    {
        "local_addrs",
        "remote_addrs",
        "proposals",
        "esp_proposals",
        "ah_proposals",
        "local_ts",
        "remote_ts",
        "vips",
        "pools",
        "groups",
    }
)
# Shared-secret types swanctl loads over load-shared, matched as name prefixes in this order.
SHARED_TYPES = ("eap", "xauth", "ntlm", "ike", "ppk")
_OTHER_SECRET_TYPES = ("private", "rsa", "ecdsa", "pkcs8", "pkcs12", "token")
_TOKEN = re.compile(
    r"""\s*(?:
        (?P<comment>\#[^\n]*)
      | (?P<open>\{)
      | (?P<close>\})
      | (?P<assign>[^\s=#{}]+)[ \t]*=[ \t]*(?:"(?P<quoted>(?:[^"\\]|\\.)*)"|(?P<value>[^\n#{}]*))
      | (?P<name>[^\s=#{}]+)(?=\s*\{)
    )""",
    re.VERBOSE,
)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", '"': '"', "\\": "\\"}


class SwanctlSyntaxError(ValueError):
    """The file is not swanctl.conf syntax we can send; says where and what."""


@dataclass(frozen=True)
class Messages:
    """What to send: load-conn bodies keyed by connection, load-shared bodies keyed by id."""

    conns: dict[str, Section]
    shared: dict[str, Section]


def parse_settings(text: str) -> Section:
    """strongSwan settings syntax to nested dicts; repeated sections merge, last key wins."""
    root: Section = {}
    stack = [root]
    pending: str | None = None
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if not match:
            raise SwanctlSyntaxError(f"line {_line(text, pos)}: cannot parse {_snippet(text, pos)}")
        pos = match.end()
        if match["comment"]:
            continue
        if match["name"]:
            pending = match["name"]
        elif match["open"]:
            if pending is None:
                raise SwanctlSyntaxError(f"line {_line(text, pos)}: '{{' without a section name")
            section = stack[-1].setdefault(pending, {})
            if not isinstance(section, dict):
                raise SwanctlSyntaxError(
                    f"line {_line(text, pos)}: {pending} is a key and a section"
                )
            stack.append(section)
            pending = None
        elif match["close"]:
            if len(stack) == 1:
                raise SwanctlSyntaxError(f"line {_line(text, pos)}: unbalanced '}}'")
            stack.pop()
        else:
            key = match["assign"]
            if key == "include":
                raise SwanctlSyntaxError(f"line {_line(text, pos)}: include is not supported")
            value = match["quoted"]
            stack[-1][key] = (
                re.sub(r"\\(.)", lambda m: _ESCAPES.get(m[1], m[1]), value)
                if value is not None
                else match["value"].strip()
            )
    if len(stack) != 1:
        raise SwanctlSyntaxError("unexpected end of file: a section is not closed with '}'")
    return root


def to_messages(text: str) -> Messages:
    settings = parse_settings(text)
    conns = {
        name: {name: _conn_body(body, f"connections.{name}")}
        for name, body in _sections(settings, "connections").items()
    }
    shared: dict[str, Section] = {}
    for name, body in _sections(settings, "secrets").items():
        message = _shared_message(name, body)
        if message is not None:
            shared[name] = message
    return Messages(conns, shared)


def _sections(settings: Section, name: str) -> dict[str, Section]:
    value = settings.get(name, {})
    if not isinstance(value, dict):
        raise SwanctlSyntaxError(f"{name} must be a section")
    return {k: v for k, v in value.items() if isinstance(v, dict)}


def _conn_body(section: Section, path: str) -> Section:
    body: Section = {}
    for key, value in section.items():
        if isinstance(value, str):
            body[key] = _split_list(value) if key.lower() in LIST_KEYS else value
        if key.lower() in ("certs", "cacerts") and isinstance(value, str):
            raise SwanctlSyntaxError(f"{path}.{key}: certificate files are not supported")
    for key, value in section.items():
        if isinstance(value, dict):
            body[key] = _conn_body(value, f"{path}.{key}")
    return body


def _split_list(value: str) -> list[str]:
    return [token.strip(" ") for token in value.split(",") if token.strip(" ")]


def _shared_message(name: str, section: Section) -> Section | None:
    kind = next((t for t in (*SHARED_TYPES, *_OTHER_SECRET_TYPES) if name.startswith(t)), None)
    if kind is None:
        raise SwanctlSyntaxError(f"secrets.{name}: unsupported secret type")
    if kind not in SHARED_TYPES:
        return None  # swanctl loads these from files, not over load-shared
    secret = section.get("secret")
    if not isinstance(secret, str):
        raise SwanctlSyntaxError(f"secrets.{name}: missing secret")
    return {
        "id": name,
        "type": kind,
        "data": _decode_secret(name, secret),
        "owners": [v for k, v in section.items() if k.startswith("id") and isinstance(v, str)],
    }


def _decode_secret(name: str, value: str) -> bytes:
    try:
        if value[:2].lower() == "0x":
            return bytes.fromhex(value[2:])
        if value[:2].lower() == "0s":
            return base64.b64decode(value[2:], validate=True)
    except (ValueError, binascii.Error):
        raise SwanctlSyntaxError(f"secrets.{name}: secret is not valid hex/base64") from None
    return value.encode()


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _snippet(text: str, pos: int) -> str:
    return repr(text[pos:].lstrip()[:30])
