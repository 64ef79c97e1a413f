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
        "cert_policy",
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
      | (?P<assign>[^\s=#{}".,:]+)[ \t]*=[ \t]*
        (?:"(?P<quoted>(?:[^"\\]|\\.)*)"|(?P<value>[^\n#{}]*))
      | (?P<name>[^\s=#{}".,:]+)(?=\s*\{)
    )""",
    re.VERBOSE,
)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r"}  # any other escaped character stands for itself
_SPACE = re.compile(r"\s*")
MAX_DEPTH = 32


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
    pos, end = 0, len(text.rstrip())
    while pos < end:
        match = _TOKEN.match(text, pos)
        if not match:
            start = _SPACE.match(text, pos).end()  # type: ignore[union-attr]
            raise SwanctlSyntaxError(
                f"line {_line(text, start)}: cannot parse {_snippet(text, start)}"
            )
        pos = match.end()
        where = _Where(text, match.start(match.lastgroup or 0))
        if match["name"]:
            pending = match["name"]
        elif match["open"]:
            stack.append(_open_section(stack, pending, where))
            pending = None
        elif match["close"]:
            if len(stack) == 1:
                raise SwanctlSyntaxError(f"{where}: unbalanced '}}'")
            stack.pop()
        elif match["assign"]:
            _assign(stack[-1], match, where)
    if len(stack) != 1:
        raise SwanctlSyntaxError("unexpected end of file: a section is not closed with '}'")
    return root


class _Where:
    """A position that becomes "line N" only when an error is raised (counting is O(n))."""

    def __init__(self, text: str, pos: int) -> None:
        self.text, self.pos = text, pos

    def __str__(self) -> str:
        return f"line {_line(self.text, self.pos)}"


def _open_section(stack: list[Section], name: str | None, where: _Where) -> Section:
    if name is None:
        raise SwanctlSyntaxError(f"{where}: '{{' without a section name")
    if len(stack) > MAX_DEPTH:
        raise SwanctlSyntaxError(f"{where}: sections nested deeper than {MAX_DEPTH}")
    section = stack[-1].setdefault(name, {})
    if not isinstance(section, dict):
        raise SwanctlSyntaxError(f"{where}: {name} is both a key and a section")
    return section


def _assign(section: Section, match: re.Match[str], where: _Where) -> None:
    """As strongSwan: escapes decoded in quotes, blanks folded outside, empty unsets."""
    key = match["assign"]
    if key == "include":
        raise SwanctlSyntaxError(f"{where}: include is not supported")
    if isinstance(section.get(key), dict):
        raise SwanctlSyntaxError(f"{where}: {key} is both a section and a key")
    quoted = match["quoted"]
    if quoted is not None:
        section[key] = re.sub(r"\\(.)", lambda m: _ESCAPES.get(m[1], m[1]), quoted)
    elif value := " ".join(match["value"].split()):
        section[key] = value
    else:
        section.pop(key, None)


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
        if key.lower() in ("certs", "cacerts", "pubkeys") and isinstance(value, str):
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
