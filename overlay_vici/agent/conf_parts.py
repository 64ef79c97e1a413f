"""The agent's swanctl.conf, kept part by part: each peer's part is rendered, parsed and
digested once per distinct key (render.Part), so that a keyring change costs what it
changed. At N=1,000 a one-peer change re-rendered and re-parsed every peer (about 80 ms
of 106, BENCHMARKS.md).

Pure: templates are read, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from overlay_vici.agent.plan import digest
from overlay_vici.agent.render import Settings, parts, swanctl_template
from overlay_vici.agent.swanctl_conf import Messages, SwanctlSyntaxError, to_messages
from overlay_vici.core.keyring import Keyring


@dataclass(frozen=True)
class Conf:
    """swanctl.conf as text, as the VICI messages swanctl would send, and their digests."""

    text: str
    messages: Messages
    digests: dict[str, str]


OFF = Conf("", Messages({}, {}), {})


class ConfParts:
    """Holds the parts of the last keyring built, and only those: a part no longer in the
    keyring (a retired generation's keys) goes with the next build."""

    def __init__(self, settings: Settings, templates: Path | None = None) -> None:
        self.settings = settings
        self.templates = templates
        self._shared: tuple[Any, ...] | None = None
        self._built: dict[tuple[Any, ...], Conf] = {}

    def build(
        self, keyring: Keyring, node_name: str, enforce: bool, own: X25519PrivateKey | None = None
    ) -> Conf:
        wanted = parts(keyring, node_name, self.settings, enforce, own)
        if wanted.shared != self._shared:  # every part changes
            self._shared, self._built = wanted.shared, {}
        template, common = swanctl_template(self.templates), wanted.common
        built = {
            part.key: self._built.get(part.key) or self._one(part.render(template, common))
            for part in wanted.each
        }
        self._built = built
        return _merged(list(built.values()))

    @staticmethod
    def _one(text: str) -> Conf:
        messages = to_messages(text)
        every = {**messages.shared, **messages.conns}
        return Conf(text, messages, {subject: digest(body) for subject, body in every.items()})


def _merged(confs: list[Conf]) -> Conf:
    """One Conf of many, as swanctl merges repeated sections. A name two parts define
    differently would merge differently from the whole file: refused."""
    conns: dict[str, Any] = {}
    shared: dict[str, Any] = {}
    digests: dict[str, str] = {}
    for conf in confs:
        conns.update(conf.messages.conns)
        shared.update(conf.messages.shared)
        digests.update(conf.digests)
    if len(conns) + len(shared) < sum(len(conf.digests) for conf in confs):
        _check_repeats(confs)  # some name is in two parts (rare: only an operator's template)
    return Conf("".join(conf.text for conf in confs), Messages(conns=conns, shared=shared), digests)


def _check_repeats(confs: list[Conf]) -> None:
    seen: dict[str, Any] = {}
    for conf in confs:
        for name, body in (*conf.messages.conns.items(), *conf.messages.shared.items()):
            if seen.setdefault(name, body) != body:
                raise SwanctlSyntaxError(
                    f"the swanctl.conf template renders {name} differently for two peers; "
                    "make each part depend only on its own peer"
                )
