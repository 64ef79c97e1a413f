"""swanctl.conf -> VICI messages: parser unit tests, fuzzing, and parity with real swanctl.

The parity tests run Debian's swanctl 5.9.8 against a tiny VICI server in this process,
capture the load-conn / load-shared requests it sends, and compare them with
`to_messages()` of the same file, after passing ours through the `vici` package's wire
encoding (ours carries str, swanctl's decode to bytes).
"""

from __future__ import annotations

import base64
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keyring_fixtures import build_keyring
from vici.protocol import FiniteStream, Message, Packet

from overlay_vici.agent.render import Settings, swanctl_conf
from overlay_vici.agent.swanctl_conf import (
    Messages,
    SwanctlSyntaxError,
    parse_settings,
    to_messages,
)

SWANCTL = shutil.which("swanctl") or "/usr/sbin/swanctl"

# --- parser unit tests -------------------------------------------------------------------


def test_nested_sections_and_key_values() -> None:
    """Sections nest as dicts; `key = value` becomes a stripped string."""
    text = "a {\n  b {\n    c = d e\n  }\n  k=v\n}\ntop = 1\n"
    assert parse_settings(text) == {"a": {"b": {"c": "d e"}, "k": "v"}, "top": "1"}


def test_comments_are_ignored_everywhere() -> None:
    """Whole-line comments, comments after a value and after `{` are dropped."""
    text = '# head\na { # after brace\n  # inside\n  k = v # trailing\n  q = "x # y"\n}\n#end'
    assert parse_settings(text) == {"a": {"k": "v", "q": "x # y"}}


def test_section_brace_may_follow_on_the_next_line() -> None:
    """`name` and its `{` may be separated by any whitespace, as in swanctl.conf(5)."""
    assert parse_settings("a\n\n  {\n k = v }") == {"a": {"k": "v"}}


@pytest.mark.parametrize(
    ("source", "value"),
    [
        (r'"plain"', "plain"),
        (r'"with  spaces "', "with  spaces "),
        (r'"a\nb"', "a\nb"),
        (r'"a\tb"', "a\tb"),
        (r'"a\rb"', "a\rb"),
        (r'"say \"hi\""', 'say "hi"'),
        (r'"back\\slash"', "back\\slash"),
        (r'"unknown \q escape"', "unknown q escape"),
        (r'"braces { } and = sign"', "braces { } and = sign"),
        ('""', ""),
    ],
)
def test_quoted_values_and_escapes(source: str, value: str) -> None:
    """Quoted values keep inner spacing and decode \\n \\t \\r \\" \\\\; others drop the \\."""
    assert parse_settings(f"s {{\n  k = {source}\n}}")["s"]["k"] == value


def test_repeated_sections_merge_and_last_key_wins_in_first_position() -> None:
    """A section written twice is one section; a repeated key keeps its first slot."""
    text = "a { x = 1\n y = 2\n b { p = 1 } }\na { x = 3\n z = 4\n b { q = 2 } }"
    merged = parse_settings(text)
    assert merged == {"a": {"x": "3", "y": "2", "b": {"p": "1", "q": "2"}, "z": "4"}}
    assert list(merged["a"]) == ["x", "y", "b", "z"]


def test_conn_keys_come_before_subsections_and_lists_split() -> None:
    """load-conn lists a section's keys first, then subsections, like swanctl's add_sections."""
    text = """
    connections {
      c {
        local { auth = psk }
        remote_addrs = 10.0.0.1 , 10.0.0.2,,10.0.0.3
        Local_TS = dynamic[ipencap]
        version = 2
        children { x { esp_proposals = aes128gcm16-x25519, aes256gcm16 } }
      }
    }"""
    body = to_messages(text).conns["c"]
    assert list(body) == ["c"]
    assert list(body["c"]) == ["remote_addrs", "Local_TS", "version", "local", "children"]
    assert body["c"]["remote_addrs"] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert body["c"]["Local_TS"] == ["dynamic[ipencap]"]
    assert body["c"]["version"] == "2"
    assert body["c"]["children"]["x"]["esp_proposals"] == ["aes128gcm16-x25519", "aes256gcm16"]


def test_keys_outside_sections_of_connections_and_secrets_are_ignored() -> None:
    """Only subsections of `connections`/`secrets` become messages; other top-level is ignored."""
    text = "connections { stray = 1\n c { k = v } }\nsecrets { stray = 2 }\nauthorities { }"
    messages = to_messages(text)
    assert list(messages.conns) == ["c"] and messages.shared == {}


@pytest.mark.parametrize(
    ("secret", "data"),
    [
        ("0x00ff10", b"\x00\xff\x10"),
        ("0X00FF10", b"\x00\xff\x10"),
        ("0sAP8Q", b"\x00\xff\x10"),
        ("0SAP8Q", b"\x00\xff\x10"),
        ("raw text", b"raw text"),
        ('"0x quoted is still hex"', None),
        ('"raw with # and {"', b"raw with # and {"),
        ("caf\u00e9", "caf\u00e9".encode()),
    ],
)
def test_secret_encodings(secret: str, data: bytes | None) -> None:
    """0x is hex, 0s is base64 (either case), anything else is the raw UTF-8 text."""
    text = f"secrets {{ ike-a {{ secret = {secret}\n }} }}"
    if data is None:
        with pytest.raises(SwanctlSyntaxError, match=r"secrets\.ike-a: secret is not valid hex"):
            to_messages(text)
    else:
        assert to_messages(text).shared["ike-a"]["data"] == data


def test_shared_secret_type_id_and_owners_in_file_order() -> None:
    """Type from the name prefix, id = section name, owners = id* keys in file order."""
    text = """secrets {
      ike-x { id-b = 10.0.0.2
              secret = 0x01
              id = 10.0.0.1
              xid = not-an-owner
              idz = 10.0.0.3 }
      eap-carol { id = carol\n secret = "pw" }
      xauth-1 { secret = pw }
      ntlm-1 { secret = pw }
      ppk-1 { secret = pw }
      private-key { file = key.pem }
      rsa-1 { file = a }
      token-1 { handle = 01 }
    }"""
    shared = to_messages(text).shared
    assert shared["ike-x"] == {
        "id": "ike-x",
        "type": "ike",
        "data": b"\x01",
        "owners": ["10.0.0.2", "10.0.0.1", "10.0.0.3"],
    }
    assert shared["eap-carol"]["owners"] == ["carol"]
    assert [m["type"] for m in shared.values()] == ["ike", "eap", "xauth", "ntlm", "ppk"]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("a {\n b = 1\n}\n}\n", r"^line 4: unbalanced '\}'$"),
        ("a {\n b {\n c = 1\n }\n", "^unexpected end of file: a section is not closed"),
        ("a = 1\n{\n}", r"^line 2: '\{' without a section name$"),
        ("a {\n  b c\n}", "cannot parse 'b c"),
        ("a = 1\na { }", "^line 2: a is both a key and a section$"),
        ("x {\n include = /etc/other.conf\n}", "^line 2: include is not supported$"),
        ("connections = 1", "^connections must be a section$"),
        (
            "connections { c { local { certs = a.pem } } }",
            "^connections.c.local.certs: certificate files are not supported$",
        ),
        (
            "connections { c { remote { CACerts = a.pem } } }",
            "^connections.c.remote.CACerts: certificate files are not supported$",
        ),
        ("secrets { psk-1 { secret = x } }", "^secrets.psk-1: unsupported secret type$"),
        ("secrets { ike-1 { id = a } }", "^secrets.ike-1: missing secret$"),
        ("secrets { ike-1 { secret { } } }", "^secrets.ike-1: missing secret$"),
        ("secrets { ike-1 { secret = 0xabc } }", "^secrets.ike-1: secret is not valid hex/base64$"),
        ("secrets { ike-1 { secret = 0s@@@@ } }", "^secrets.ike-1: secret is not valid hex"),
    ],
)
def test_errors_name_the_line_or_path(text: str, error: str) -> None:
    """Malformed input raises SwanctlSyntaxError saying where (line or section path) and what."""
    with pytest.raises(SwanctlSyntaxError, match=error):
        to_messages(text)


def test_error_line_numbers_count_from_one_across_comments() -> None:
    """Line numbers count comment lines and blank lines too."""
    text = "# 1\n\n# 3\na {\n}\n}\n"
    with pytest.raises(SwanctlSyntaxError, match=r"^line 6:"):
        parse_settings(text)


@pytest.mark.parametrize(
    ("text", "line"),
    [("a {\n  b c\n}", 2), ("a {\n k = v\n}\n\n\n  = x", 6), ("x = 1\n\n\n@", 4)],
)
def test_cannot_parse_error_names_the_offending_line(text: str, line: int) -> None:
    """BUG: "cannot parse" reports the line where the previous token ended, not the bad one."""
    with pytest.raises(SwanctlSyntaxError, match=f"^line {line}: cannot parse"):
        parse_settings(text)


def test_deep_nesting_raises_syntax_error_not_recursion_error() -> None:
    """BUG: _conn_body recurses per nesting level, so deep sections raise RecursionError."""
    depth = 2000
    text = "connections { c { " + "s { " * depth + "} " * (depth + 2)
    with pytest.raises(SwanctlSyntaxError):
        to_messages(text)


class _SliceCounter(str):
    """A str that counts how many characters slicing it has copied."""

    copied = 0

    def __getitem__(self, key: Any) -> str:
        result = super().__getitem__(key)
        if isinstance(key, slice):
            _SliceCounter.copied += len(result)
        return result


def test_swanctl_conf_parse_is_linear() -> None:
    """Parsing copies the text at most about once, so it stays linear in the file size.

    Regression: parse_settings used to copy the rest of the text for every token
    (`text[pos:].strip()`), which took 8-15 s for 1,000 peers, on every keyring change.
    """
    text = _SliceCounter(swanctl_conf(build_keyring(51), "node-0", Settings()))
    size, _SliceCounter.copied = len(text), 0
    assert len(to_messages(text).conns) == 50
    copied = _SliceCounter.copied
    assert copied <= 2 * size, f"parser copied {copied} characters of a {size}-character file"


# --- fuzzing -----------------------------------------------------------------------------

TOKENS = [
    "connections", "secrets", "ike-a", "eap-b", "c", "local", "children", "remote_addrs",
    "secret", "id", "id-2", "0x", "0s", "00ff", "AP8Q", "include", "certs",
    "{", "}", "=", "#", "\n", " ", "\t", '"', "\\", ",", "\\n", "\r",
]  # fmt: skip


def _only_syntax_errors(text: str) -> None:
    try:
        messages = to_messages(text)
    except SwanctlSyntaxError as exc:
        assert str(exc) and "\n" not in str(exc), repr(str(exc))  # one line for the log
    else:
        assert isinstance(messages, Messages)


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=300))
def test_fuzz_arbitrary_text_only_raises_syntax_error(text: str) -> None:
    """Any text parses or raises SwanctlSyntaxError, never another exception."""
    _only_syntax_errors(text)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=60).map("".join))
def test_fuzz_token_soup_only_raises_syntax_error(text: str) -> None:
    """Near-valid swanctl.conf made of its own tokens parses or raises SwanctlSyntaxError."""
    _only_syntax_errors(text)


# --- a VICI server that records what swanctl sends ------------------------------------------

EXPECTED_COMMANDS = {
    "get-keys",
    "get-shared",
    "get-authorities",
    "get-pools",
    "get-conns",
    "load-shared",
    "load-conn",
}
_ANSWERS: dict[str, dict[str, Any]] = {
    "get-conns": {"conns": []},
    "get-shared": {"keys": []},
    "get-keys": {"keys": []},
    "get-authorities": {},
    "get-pools": {},
}


@dataclass
class Request:
    command: str
    message: OrderedDict[str, Any]


@dataclass
class CaptureServer:
    """Speaks enough VICI for `swanctl --load-all`: empty answers, every load succeeds."""

    path: str
    requests: list[Request] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._listener = socket.socket(socket.AF_UNIX)
        self._listener.bind(self.path)
        self._listener.listen()
        self._listener.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def uri(self) -> str:
        return f"unix://{self.path}"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(10)
                try:
                    while True:
                        self._handle(conn, self._receive(conn))
                except (EOFError, OSError):
                    pass

    @staticmethod
    def _receive(conn: socket.socket) -> bytes:
        def exactly(count: int) -> bytes:
            data = b""
            while len(data) < count:
                chunk = conn.recv(count - len(data))
                if not chunk:
                    raise EOFError
                data += chunk
            return data

        (length,) = struct.unpack("!I", exactly(4))
        return exactly(length)

    def _handle(self, conn: socket.socket, packet: bytes) -> None:
        kind, name_len = packet[0], packet[1]
        name = packet[2 : 2 + name_len].decode()
        if kind in (Packet.EVENT_REGISTER, Packet.EVENT_UNREGISTER):
            self.unexpected.append(f"event registration {name}")
            self._send(conn, bytes([Packet.EVENT_CONFIRM]))
            return
        if kind != Packet.CMD_REQUEST:
            self.unexpected.append(f"packet type {kind}")
            return
        message = Message.deserialize(FiniteStream(packet[2 + name_len :]))
        self.requests.append(Request(name, message))
        if name not in EXPECTED_COMMANDS:
            self.unexpected.append(name)
        answer = _ANSWERS.get(name, {"success": "yes"})
        self._send(conn, bytes([Packet.CMD_RESPONSE]) + Message.serialize(answer))

    @staticmethod
    def _send(conn: socket.socket, payload: bytes) -> None:
        conn.sendall(struct.pack("!I", len(payload)) + payload)


@dataclass
class SwanctlRun:
    result: subprocess.CompletedProcess[str]
    requests: list[Request]
    unexpected: list[str]

    @property
    def errors(self) -> str:
        """stderr without the noise of the host's plugin list and missing credential dirs."""
        noise = ("plugin '", "opening directory '")
        return "\n".join(
            line for line in self.result.stderr.splitlines() if not line.startswith(noise)
        )

    @property
    def rejected(self) -> bool:
        """swanctl could not parse the file (it then carries on with an empty config)."""
        return "invalid config file" in self.result.stderr

    def messages(self, command: str) -> list[OrderedDict[str, Any]]:
        return [r.message for r in self.requests if r.command == command]

    def conns(self) -> list[tuple[str, OrderedDict[str, Any]]]:
        return [(next(iter(m)), m) for m in self.messages("load-conn")]

    def shared(self) -> list[tuple[str, OrderedDict[str, Any]]]:
        return [(m["id"].decode(), m) for m in self.messages("load-shared")]


@pytest.fixture
def swanctl() -> Iterator[Any]:
    """Run `swanctl --load-all --file <text>` against a capturing VICI server."""
    if not Path(SWANCTL).exists():
        pytest.skip("swanctl is not installed")
    work = Path(tempfile.mkdtemp(prefix="ov-swanctl-"))  # short: AF_UNIX paths max 107 bytes

    def run(text: str, noprompt: bool = True) -> SwanctlRun:
        conf = work / "swanctl.conf"
        conf.write_text(text)
        server = CaptureServer(str(work / "capture.vici"))
        try:
            flags = ["--noprompt"] if noprompt else []
            result = subprocess.run(
                [SWANCTL, "--load-all", *flags, "--file", str(conf), "--uri", server.uri],
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
                timeout=20,
                check=False,
            )
        finally:
            server.close()
            Path(server.path).unlink(missing_ok=True)
        return SwanctlRun(result, server.requests, server.unexpected)

    yield run
    shutil.rmtree(work, ignore_errors=True)


def wire(message: dict[str, Any]) -> OrderedDict[str, Any]:
    """Our message as charon receives it: through the vici package's encoding and back."""
    return Message.deserialize(FiniteStream(Message.serialize(message)))


def plain(value: Any) -> Any:
    """Order-insensitive form (dicts), keeping list vs str vs bytes distinctions."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def ordered(value: Any) -> Any:
    """Order-sensitive form: every section becomes a list of (key, value) pairs."""
    if isinstance(value, dict):
        return [(k, ordered(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [ordered(v) for v in value]
    return value


def ours(text: str) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    messages = to_messages(text)
    return (
        [(name, wire(m)) for name, m in messages.conns.items()],
        [(key_id, wire(m)) for key_id, m in messages.shared.items()],
    )


def assert_same_messages(run: SwanctlRun, text: str) -> None:
    assert run.result.returncode == 0, run.errors
    assert not run.rejected, run.errors
    assert run.unexpected == []
    our_conns, our_shared = ours(text)
    assert plain(dict(our_conns)) == plain(dict(run.conns()))
    assert plain(dict(our_shared)) == plain(dict(run.shared()))
    assert len(our_conns) == len(run.conns()) and len(our_shared) == len(run.shared())


# --- parity with swanctl -----------------------------------------------------------------

HAND_WRITTEN = r"""
# An operator's file: comments, quoting, lists with spaces, several children.
connections {
  site-a {   # the first connection
    version = 2
    local_addrs = 192.0.2.1
    remote_addrs = 198.51.100.1 ,198.51.100.2,   198.51.100.3
    proposals = aes256gcm16-prfsha384-ecp384, aes128gcm16-prfsha256-x25519
    local {
      auth = psk
      id = "CN=gateway a, O=Example \"quoted\""
    }
    remote-1 {
      auth = psk
      id = %any
    }
    children {
      net {
        local_ts = 10.1.0.0/16, 10.2.0.0/16
        remote_ts = 10.3.0.0/16
        esp_proposals = aes128gcm16-x25519
        start_action = trap
      }
      ipip {
        mode = transport
        local_ts = dynamic[ipencap]
        remote_ts = dynamic[ipencap]
        updown = "/usr/local/bin/updown --tab\there # not a comment"
      }
    }
  }
  site-b {
    remote_addrs = 203.0.113.7
    local { auth = psk }
    remote { auth = psk }
    children { one { mode = tunnel } two { mode = transport } three { mode = pass } }
  }
  site-a {
    # a second block for site-a merges into the first
    dpd_delay = 30s
    children { net { rekey_time = 1h } }
  }
}
secrets {
  ike-hex {
    id-1 = 192.0.2.1
    id-2 = 198.51.100.1
    secret = 0x6b65792d6d6174657269616c
  }
  ike-base64 {
    id = gateway-a
    secret = 0sa2V5IG1hdGVyaWFs
  }
  ike-raw { id-x = 203.0.113.7
    secret = "a raw secret, with # and = inside"
  }
  ike-raw-unquoted { secret = plain-raw-secret }
  eap-carol {
    id = carol@example.com
    secret = "Ar3etTnp"
  }
  xauth-dave { id = dave
    secret = 0X0102 }
}
"""


def rendered_file(peers: int = 4) -> str:
    keyring = build_keyring(peers, generations=(1, 2), sent=2, serial=9)
    return swanctl_conf(keyring, "node-0", Settings())


@pytest.mark.parametrize("noprompt", [True, False], ids=["noprompt", "prompt"])
def test_rendered_file_matches_swanctl(swanctl: Any, noprompt: bool) -> None:
    """For the agent's own rendered file (3 peers, 2 generations) ours == swanctl's messages."""
    text = rendered_file()
    run = swanctl(text, noprompt=noprompt)
    assert_same_messages(run, text)
    assert len(run.conns()) == 3 and len(run.shared()) == 6
    assert {r.command for r in run.requests} == EXPECTED_COMMANDS


def test_hand_written_file_matches_swanctl(swanctl: Any) -> None:
    """An operator-style file (quotes, comments, 0x/0s/raw, lists, merged sections) matches."""
    run = swanctl(HAND_WRITTEN)
    assert_same_messages(run, HAND_WRITTEN)
    assert [name for name, _ in run.conns()] == ["site-a", "site-b"]
    assert len(run.shared()) == 6


@pytest.mark.parametrize("which", ["rendered", "hand-written"])
def test_message_and_key_order_matches_swanctl(swanctl: Any, which: str) -> None:
    """swanctl preserves file order (messages, keys, sections); so do we, exactly."""
    text = rendered_file(6) if which == "rendered" else HAND_WRITTEN
    run = swanctl(text)
    our_conns, our_shared = ours(text)
    assert ordered(our_conns) == ordered(run.conns())
    assert ordered(our_shared) == ordered(run.shared())
    sequence = [r.command for r in run.requests if r.command.startswith("load-")]
    assert sequence == ["load-shared"] * len(our_shared) + ["load-conn"] * len(our_conns)


# Edge cases. Property: where swanctl accepts a file we send exactly what it sends, or we
# refuse it with SwanctlSyntaxError (loud, never silently different); where swanctl rejects
# the file we must refuse it too. Refusals of files swanctl accepts are listed in STRICTER.
EDGE_CASES = {
    "list key case-insensitive": "connections { c { REMOTE_ADDRS = a, b } }",
    "empty list items dropped": "connections { c { local_ts = ,a,, b , } }",
    "quoted list value": 'connections { c { proposals = "aes128 , aes256" } }',
    "value ends at brace": "connections { c { k = v} }",
    "empty quoted value": 'connections { c { k = "" } }',
    "comment after quote": 'connections { c { k = "v" # c\n } }',
    "escapes n t r quote backslash": r'connections { c { k = "\n\t\r\"\\" } }',
    "unknown escape drops backslash": r'connections { c { k = "\q\x" } }',
    "slash and brackets in names": "connections { a/b[1] { k = v } }",
    "CRLF line ends": "connections {\r\n c {\r\n  k = v\r\n }\r\n}\r\n",
    "multi-line quoted": 'connections { c { k = "a\nb" } }',
    "owners: id prefix only": "secrets { ike-a { idx = 1\n xid = 2\n id = 3\n secret = s } }",
    "unclosed section": "connections { c { k = v }",
}
# swanctl accepts these, we refuse them: safe (the agent reports the error), listed so a
# change in either direction is noticed.
STRICTER = {
    "secret 0x with colons": "secrets { ike-a { secret = 0x01:02:03 } }",
    "secret odd hex": "secrets { ike-a { secret = 0x123 } }",
    "unsupported secret type": "secrets { psk-a { secret = s } }",
    "bliss key skipped": "secrets { bliss-a { file = k } }",
    "quoted then unquoted": 'connections { c { k = "a" b } }',
    "key then section of same name": "connections { c { local = 3\n local { id = 1 } } }",
    "quoted continuation": 'connections { c { k = "a\\\nb" } }',
}
# BUGS: we silently send something other than swanctl would, or accept what it rejects.
DIVERGENT = {
    # _ESCAPES maps \b and \f to control characters; strongSwan's lexer knows only \n \r \t.
    "escapes b and f": r'connections { c { k = "a\bb\fc" } }',
    # strongSwan joins the words of an unquoted value with single spaces.
    "runs of spaces in a value": "connections { c { k = a    b } }",
    "tab inside a list": "connections { c { remote_addrs = 10.0.0.1,\t10.0.0.2 } }",
    # `k =` with nothing after it unsets k in strongSwan; we send k = "".
    "empty unquoted value": "connections { c { k = v\n k =\n j = 1 } }",
    # swanctl 5.9.8 is_list_key() also lists cert_policy.
    "cert_policy is a list": "connections { c { local { cert_policy = 1.2.3, 4.5.6 } } }",
    # swanctl loads pubkeys like certs (file or inline 0x/0s blobs); we pass the text on.
    "pubkeys are files": "connections { c { remote { pubkeys = 0x0102 } } }",
    # strongSwan names cannot contain . , : or "; our _TOKEN accepts them.
    "dot in a section name": "connections { node.example.com { k = v } }",
    "dot in a key": "connections { c { a.b = v } }",
    "comma in a name": "connections { a,b { k = v } }",
    "colon in a key": "connections { c { a:b = v } }",
    "quote in a name": 'connections { a"b { k = v } }',
    # strongSwan keeps the section; we overwrite it with the key (the reverse order raises).
    "section then key of same name": "connections { c { local { id = 1 }\n local = 3 } }",
}


def _matches_or_refuses(run: SwanctlRun, text: str) -> bool:
    """True if we refused the text; otherwise assert we send exactly what swanctl sent."""
    try:
        our_conns, our_shared = ours(text)
    except SwanctlSyntaxError:
        return True
    assert not run.rejected, f"swanctl rejects this file but we accept it: {run.errors}"
    assert ordered(our_conns) == ordered(run.conns())
    assert ordered(our_shared) == ordered(run.shared())
    return False


@pytest.mark.parametrize("case", list(EDGE_CASES), ids=list(EDGE_CASES))
def test_edge_case_matches_swanctl_or_is_refused(swanctl: Any, case: str) -> None:
    """Syntax corners: equal to swanctl's messages, or refused where swanctl refuses too."""
    run = swanctl(EDGE_CASES[case])
    if _matches_or_refuses(run, EDGE_CASES[case]):
        assert run.rejected, "we refuse a file swanctl accepts; move the case to STRICTER"


@pytest.mark.parametrize("case", list(STRICTER), ids=list(STRICTER))
def test_stricter_than_swanctl_is_refused_loudly(swanctl: Any, case: str) -> None:
    """Inputs swanctl tolerates (odd hex, unknown types, ...) raise SwanctlSyntaxError here."""
    run = swanctl(STRICTER[case])
    assert not run.rejected
    with pytest.raises(SwanctlSyntaxError):
        to_messages(STRICTER[case])


@pytest.mark.parametrize("case", list(DIVERGENT), ids=list(DIVERGENT))
def test_divergence_from_swanctl_is_fixed(swanctl: Any, case: str) -> None:
    """BUG: each case is silently translated differently from swanctl 5.9.8 (see comments)."""
    _matches_or_refuses(swanctl(DIVERGENT[case]), DIVERGENT[case])


def test_rendered_file_with_dotted_node_names_loads_in_swanctl(swanctl: Any) -> None:
    """BUG: node names may contain dots (DNS-1123), but swanctl 5.9.8 rejects dotted names."""
    keyring = build_keyring(3)
    renamed = type(keyring)(
        keyring.serial,
        keyring.sent,
        keyring.generations,
        tuple(type(p)(f"{p.name}.eu-west-1.compute.internal", p.ip) for p in keyring.peers),
    )
    text = swanctl_conf(renamed, "node-0.eu-west-1.compute.internal", Settings())
    run = swanctl(text)
    assert not run.rejected, run.errors
    assert len(run.conns()) == 2


def test_base64_and_hex_round_trip_through_the_wire() -> None:
    """Binary secret data survives the vici encoding byte for byte (no str conversion)."""
    data = bytes(range(256))
    text = f"secrets {{ ike-b {{ secret = 0s{base64.b64encode(data).decode()} }} }}"
    assert wire(to_messages(text).shared["ike-b"])["data"] == data
