"""The command line: mtu, render previews, help, and one-sentence errors with exit code 2."""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from keyring_fixtures import build_keyring

from overlay_vici.agent import netfilter
from overlay_vici.agent.guard_plan import install_script, outside_peers
from overlay_vici.agent.render import Settings, strongswan_conf, swanctl_conf
from overlay_vici.agent.secret import read_keyring
from overlay_vici.cli import main
from overlay_vici.core.contract import KEYRING_FILE
from overlay_vici.core.files import publish_secret
from overlay_vici.core.keyring import Encryption, Peer, dumps

EXE = Path(sys.executable).with_name("overlay-vici")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed console script, in a child process (the agent installs signal handlers)."""
    return subprocess.run(
        [str(EXE), *args], capture_output=True, text=True, timeout=30, check=False
    )


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    publish_secret(tmp_path / "keys", {KEYRING_FILE: dumps(build_keyring(4))})
    return tmp_path / "keys"


def test_mtu_1500_prints_1446_from_the_console_script() -> None:
    """The installed entry point prints the bare number, nothing else."""
    result = run("mtu", "1500")
    assert (result.returncode, result.stdout, result.stderr) == (0, "1446\n", "")


def test_mtu_below_minimum_exits_2_with_one_sentence(capsys: pytest.CaptureFixture[str]) -> None:
    """A link MTU below 576 is a usage error: exit 2, the reason on one stderr line."""
    assert cli(capsys, "mtu", "500") == (
        2,
        "",
        "overlay-vici: external MTU 500 is below the IPv4 minimum of 576\n",
    )


@pytest.mark.parametrize(
    "args",
    [[], ["agent"], ["render"], ["render", "strongswan"], ["render", "swanctl"], ["mtu"]],
    ids=lambda a: " ".join(a) or "top",
)
def test_help_of_every_command(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    """`--help` works for each (sub)command: exit 0 and a usage line naming it."""
    code, out, err = cli(capsys, *args, "--help")
    assert code == 0 and err == ""
    assert out.startswith(f"usage: overlay-vici {' '.join(args)}".rstrip())


def test_render_strongswan_prints_what_render_produces(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`render strongswan` output is byte-identical to render.strongswan_conf()."""
    code, out, _ = cli(capsys, "render", "strongswan", "--vici-socket", "/run/c.vici")
    assert code == 0 and out == strongswan_conf("/run/c.vici")
    code, out, _ = cli(
        capsys, "render", "strongswan", "--vici-socket", "/s", "--log-file", "/var/log/c.log"
    )
    assert code == 0 and out == strongswan_conf("/s", "/var/log/c.log")


def test_render_swanctl_prints_what_the_agent_loads(
    capsys: pytest.CaptureFixture[str], keys: Path
) -> None:
    """`render swanctl` is swanctl_conf() of the mounted keyring, settings included."""
    code, out, err = cli(capsys, "render", "swanctl", "--node", "node-1", "--keys", str(keys))
    assert (code, err) == (0, "")
    assert out == swanctl_conf(read_keyring(keys), "node-1", Settings())
    code, out, _ = cli(
        capsys, "render", "swanctl", "--node", "node-1", "--keys", str(keys),
        "--dpd-delay", "10s", "--esp-proposals", "aes256gcm16-ecp384",
    )  # fmt: skip
    settings = Settings(dpd_delay="10s", esp_proposals="aes256gcm16-ecp384")
    assert code == 0 and out == swanctl_conf(read_keyring(keys), "node-1", settings)


def test_render_swanctl_honours_template_override(
    capsys: pytest.CaptureFixture[str], keys: Path, tmp_path: Path
) -> None:
    """--templates DIR replaces the built-in swanctl.conf.j2, rendered once per peer."""
    (tmp_path / "tpl").mkdir()
    (tmp_path / "tpl" / "swanctl.conf.j2").write_text("# {{ peers[0].name }}\n")
    code, out, _ = cli(
        capsys, "render", "swanctl", "--node", "node-0", "--keys", str(keys),
        "--templates", str(tmp_path / "tpl"),
    )  # fmt: skip
    assert (code, out) == (0, "# node-1\n# node-2\n# node-3\n")


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--ike-rekey-time", "5x", "ike_rekey_time '5x' is not a duration like 30s, 1h or 0"),
        ("--dpd-delay", "soon", "dpd_delay 'soon' is not a duration"),
        ("--esp-proposals", "AES", "esp_proposals 'AES' is not a strongSwan proposal"),
    ],
)
def test_bad_setting_exits_2_with_one_sentence(
    capsys: pytest.CaptureFixture[str], keys: Path, flag: str, value: str, message: str
) -> None:
    """A malformed setting: exit 2, exactly one stderr line naming the setting."""
    code, out, err = cli(
        capsys, "render", "swanctl", "--node", "node-0", "--keys", str(keys), flag, value
    )
    assert (code, out) == (2, "")
    assert err.startswith(f"overlay-vici: {message}") and err.count("\n") == 1


def test_agent_bad_setting_exits_2_before_touching_charon(tmp_path: Path) -> None:
    """The agent refuses a bad setting at start: exit 2, one line, no traceback."""
    result = run(
        "agent", "--node", "n", "--keys", str(tmp_path), "--vici", "unix:///nonexistent",
        "--ike-rekey-time", "5x", "--node-key", str(tmp_path / "node.key"),
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        "overlay-vici: ike_rekey_time '5x' is not a duration like 30s, 1h or 0"
    )
    assert "Traceback" not in result.stderr


def test_agent_bad_vici_uri_exits_2(tmp_path: Path) -> None:
    """A VICI URI that is not unix:// is a usage error with the expected form."""
    result = run(
        "agent", "--node", "n", "--keys", str(tmp_path), "--vici", "tcp://1.2.3.4",
        "--node-key", str(tmp_path / "node.key"),
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        "overlay-vici: VICI URI 'tcp://1.2.3.4' must look like unix:///run/charon.vici"
    )


@pytest.mark.parametrize(
    "args",
    [["--bogus"], ["mtu", "fifteen-hundred"], ["render", "swanctl", "--node", "x"], ["nope"]],
    ids=["unknown flag", "non-integer", "missing --keys", "unknown command"],
)
def test_bad_usage_exits_2_naming_the_problem(
    capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    """argparse errors: exit 2, stdout empty, the last stderr line names the problem."""
    code, out, err = cli(capsys, *args)
    assert (code, out) == (2, "")
    assert err.splitlines()[-1].startswith("overlay-vici")
    assert ": error: " in err.splitlines()[-1]


def test_render_swanctl_with_malformed_keyring_exits_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A truncated keyring: exit 2 and the keyring's own one-sentence error."""
    text = dumps(build_keyring(3))
    publish_secret(tmp_path / "keys", {KEYRING_FILE: text[:40]})
    keys = str(tmp_path / "keys")
    code, out, err = cli(capsys, "render", "swanctl", "--node", "node-0", "--keys", keys)
    assert (code, out) == (2, "")
    assert err.startswith("overlay-vici: keyring is not valid JSON (")
    assert err.endswith("the file is truncated or corrupt, republish the Secret from the master\n")
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "overlay-vici: no keyring.json in {keys}; check the Secret volume"),
        ("other node", "overlay-vici: node node-0 is not in the keyring's peer list;"),
        ("version", "overlay-vici: keyring format version 3 is not supported (expected 1 or 2)"),
    ],
)
def test_render_swanctl_keyring_problems_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, setup: str, message: str
) -> None:
    """No keyring, a keyring without this node, a newer format: exit 2 with the reason."""
    keys = tmp_path / "keys"
    keys.mkdir()
    if setup == "other node":
        publish_secret(keys, {KEYRING_FILE: dumps(build_keyring((1, 2)))})
    elif setup == "version":
        newer = dumps(build_keyring(2)).replace('"version": 1', '"version": 3')
        publish_secret(keys, {KEYRING_FILE: newer})
    code, out, err = cli(capsys, "render", "swanctl", "--node", "node-0", "--keys", str(keys))
    assert (code, out) == (2, "")
    assert err.startswith(message.format(keys=keys)) and err.count("\n") == 1


@pytest.mark.parametrize(
    "args", [["guard"], ["guard", "show"], ["guard", "remove"], ["guard", "install"]]
)
def test_help_of_the_guard_commands(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    code, out, err = cli(capsys, *args, "--help")
    assert code == 0 and err == ""
    assert out.startswith(f"usage: overlay-vici {' '.join(args)}")


def test_guard_without_iptables_exits_2_with_one_sentence(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(netfilter.shutil, "which", lambda _: None)
    code, out, err = cli(capsys, "guard", "show", "--iptables-backend", "nft")
    assert (code, out) == (2, "")
    assert err.startswith("overlay-vici: iptables-nft-save/-restore not found; install iptables")
    assert err.count("\n") == 1


@pytest.fixture
def netns() -> Iterator[str]:
    if not (os.geteuid() == 0 and shutil.which("ip") and shutil.which("iptables-legacy-save")):
        pytest.skip("needs root, iproute2 and iptables (a private network namespace)")
    name = f"ovv-cli-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_guard_show_and_remove_in_a_node_namespace(netns: str, backend: str) -> None:
    """What an operator sees on a node: absent, whole (with the allow-list), partial, and
    removed; show's exit code says whether the guard is whole."""

    def guard(action: str) -> tuple[int, str]:
        cmd = [str(EXE), "guard", action, "--iptables-backend", backend]
        done = subprocess.run(
            ["ip", "netns", "exec", netns, *cmd], capture_output=True, text=True, timeout=30
        )
        assert done.stderr == ""
        return done.returncode, done.stdout

    def iptables(tool: str, *args: str, stdin: str | None = None) -> None:
        cmd = ["ip", "netns", "exec", netns, f"iptables-{backend}{tool}", *args]
        subprocess.run(cmd, input=stdin, text=True, check=True, timeout=30)

    assert guard("show") == (1, f"guard not installed (iptables-{backend})\n")
    outside = outside_peers([("n6", "10.99.0.6"), ("n5", "10.99.0.5")])
    iptables("-restore", "--noflush", stdin=install_script(outside, {}))
    assert guard("show") == (
        0,
        f"guard installed (iptables-{backend}): unprotected IPIP is dropped both ways; "
        "except to and from the nodes outside the mesh:\n"
        "  10.99.0.5  n5\n"
        "  10.99.0.6  n6\n",
    )
    iptables("", "-t", "raw", "-D", "OUTPUT", "-p", "4", "-j", "OVERLAY-VICI-GUARD-OUT")
    code, out = guard("show")
    assert code == 1 and out.startswith(f"guard partly installed (iptables-{backend}): ")
    assert guard("remove") == (0, f"guard removed (iptables-{backend})\n")
    assert guard("remove") == (0, f"no guard installed (iptables-{backend})\n")
    assert guard("show")[0] == 1


@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_guard_install_does_what_the_agents_first_pass_does(
    netns: str, backend: str, tmp_path: Path
) -> None:
    """The init container's command: the guard with the keyring's allow-list when the
    switch is on for this node, nothing when it is not, exit 2 with the reason and nothing
    installed when the keyring cannot be read."""
    keys = tmp_path / "keys"
    keys.mkdir()

    def guard(*args: str) -> tuple[int, str, str]:
        cmd = [str(EXE), "guard", *args, "--iptables-backend", backend]
        done = subprocess.run(
            ["ip", "netns", "exec", netns, *cmd], capture_output=True, text=True, timeout=30
        )
        return done.returncode, done.stdout, done.stderr

    def install(node: str = "node-0") -> tuple[int, str, str]:
        return guard("install", "--node", node, "--keys", str(keys))

    code, out, err = install()
    assert (code, out) == (2, "") and err.startswith("overlay-vici: no keyring.json in ")
    assert guard("show")[:2] == (1, f"guard not installed (iptables-{backend})\n")

    on = build_keyring(3)
    outside = (Peer("n5", "10.99.0.5"),)
    publish_secret(keys, {KEYRING_FILE: dumps(dataclasses.replace(on, outside=outside))})
    assert install() == (
        0,
        f"guard installed (iptables-{backend}): unprotected IPIP is dropped both ways; "
        "except to and from the nodes outside the mesh:\n  10.99.0.5  n5\n",
        "",
    )
    assert guard("show")[0] == 0
    assert guard("remove")[0] == 0

    off = dataclasses.replace(on, serial=2, encryption=Encryption(enabled=False, at=0.0))
    publish_secret(keys, {KEYRING_FILE: dumps(off)})
    assert install() == (
        0, "encryption is off for node node-0 (keyring serial 2): no guard needed\n", ""
    )  # fmt: skip
    self_outside = (Peer("node-0", on.peers[0].ip),)  # opted out: no longer a peer
    opted_out = dataclasses.replace(build_keyring((1, 2), serial=3), outside=self_outside)
    publish_secret(keys, {KEYRING_FILE: dumps(opted_out)})
    assert install()[:2] == (
        0, "encryption is off for node node-0 (keyring serial 3): no guard needed\n"
    )  # fmt: skip
    assert guard("show")[:2] == (1, f"guard not installed (iptables-{backend})\n")


def test_report_lease_outside_a_pod_says_what_to_pass(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    code, _, err = cli(capsys, "report-lease", "--node", "node-0", "--status",
                       str(tmp_path / "status.json"))  # fmt: skip
    assert code == 2
    assert err == "overlay-vici: not in a pod (no KUBERNETES_SERVICE_HOST); pass --server\n"
