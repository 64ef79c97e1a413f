"""Local mode: the same master core over files (no Kubernetes), and its commands."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from overlay_vici.cli import main
from overlay_vici.core import keyring as kr
from overlay_vici.core.files import write_json
from overlay_vici.master.local import (
    LocalStore,
    NodesFileError,
    node_secret_dir,
    node_status_path,
    parse_nodes,
    secret_dir,
)
from overlay_vici.master.master import Master
from overlay_vici.master.rotation import NodeInfo, Policy

EXE = Path(sys.executable).with_name("overlay-vici")
POLICY = Policy(interval=3600, agent_timeout=30)
QUICK = Policy(interval=3600, agent_timeout=30, cutover_lead=0.3)  # a switch within the test


def nodes_file(path: Path, count: int = 3) -> Path:
    path.write_text(
        json.dumps([{"name": f"n{i}", "ip": f"10.0.0.{i}"} for i in range(1, count + 1)])
    )
    return path


@pytest.fixture
def local(tmp_path: Path) -> tuple[Path, Path, Master]:
    state = tmp_path / "state"
    nodes = nodes_file(tmp_path / "nodes.json")
    master = Master(LocalStore(state, nodes), POLICY)
    return state, nodes, master


def ack(state: Path, *names: str, **fields: object) -> None:
    """Each agent's status report for the keyring in its own Secret copy."""
    for name in names:
        keyring = kr.loads((node_secret_dir(state, name) / "keyring.json").read_text())
        doc = {
            "node": name,
            "updated": time.time(),
            "keyring_serial": keyring.serial,
            "sent_generation": keyring.sent,
            "reauthenticated": True,
            "stale_ike_sas": 0,
            "stale_peers": [],
            "generations": {
                str(g.id): "sent" if g.id == keyring.sent else "accepted"
                for g in keyring.generations
            },
            "peers_up": 2,
            "peers_expected": 2,
            "last_error": None,
            **fields,
        }
        write_json(node_status_path(state, name), doc)


def phase(state: Path) -> str:
    return json.loads((secret_dir(state) / "master.json").read_text())["phase"]


def test_every_node_gets_the_secret_in_kubelets_layout(local: tuple[Path, Path, Master]) -> None:
    state, _, master = local
    master.step()
    for name in ("n1", "n2", "n3"):
        directory = node_secret_dir(state, name)
        assert (directory / "..data").is_symlink()
        assert os.readlink(directory / "keyring.json") == "..data/keyring.json"
        keyring = kr.loads((directory / "keyring.json").read_text())
        assert [p.name for p in keyring.peers] == ["n1", "n2", "n3"]
        assert oct((directory / "..data" / "keyring.json").stat().st_mode & 0o777) == "0o600"


def test_a_requested_rotation_runs_through_the_phases_on_the_agents_reports(
    local: tuple[Path, Path, Master], capsys: pytest.CaptureFixture[str]
) -> None:
    state, _, master = local
    master.step()
    ack(state, "n1", "n2", "n3")
    assert main(["rotate", "--local", str(state)]) == 0
    master.step()
    assert phase(state) == "stage"
    ack(state, "n1", "n2")
    master.step()
    assert phase(state) == "stage"  # n3 is live and has not staged yet
    capsys.readouterr()
    assert main(["status", "--local", str(state), "--json"]) == 0
    view = json.loads(capsys.readouterr().out)
    assert (view["active_generation"], view["rotating"], view["waiting"]) == (1, True, ["n3"])
    assert main(["status", "--local", str(state)]) == 0
    text = capsys.readouterr().out
    assert "rotation 1 under way, phase stage, waiting for n3" in text
    for expected in ("switch", "retire", "idle"):
        ack(state, "n1", "n2", "n3")
        master.step()
        assert phase(state) == expected
    capsys.readouterr()
    main(["status", "--local", str(state), "--json"])
    view = json.loads(capsys.readouterr().out)
    assert (view["active_generation"], view["rotating"], view["generations"]) == (
        2,
        False,
        {"2": "sent"},
    )


def test_the_node_list_is_followed_and_a_bad_one_keeps_the_last_good(
    local: tuple[Path, Path, Master],
) -> None:
    state, nodes, master = local
    master.step()
    nodes_file(nodes, 4)
    master.step()
    keyring = kr.loads((secret_dir(state) / "keyring.json").read_text())
    assert keyring.serial == 2 and [p.name for p in keyring.peers][-1] == "n4"
    assert (node_secret_dir(state, "n4") / "keyring.json").exists()
    nodes.write_text("{not: [valid")
    master.step()
    assert kr.loads((secret_dir(state) / "keyring.json").read_text()).serial == 2


def test_a_stale_write_is_refused(local: tuple[Path, Path, Master]) -> None:
    state, nodes, master = local
    master.step()
    store = LocalStore(state, nodes)
    old = store.read()
    master.store.write(old.keyring or "", old.master or "", old.version)  # someone else
    assert store.write(old.keyring or "", old.master or "", old.version) is False


def test_parse_nodes_takes_json_and_yaml_and_names_the_problem() -> None:
    assert parse_nodes('[{"name": "a", "ip": "10.0.0.1"}]') == [NodeInfo("a", "10.0.0.1")]
    assert parse_nodes("- name: a\n  ip: 10.0.0.1\n- name: b\n  opt_out: true\n") == [
        NodeInfo("a", "10.0.0.1"),
        NodeInfo("b", None, True),
    ]
    for text, message in [
        ("{}", "must be a list"),
        ("[1]", "must be an object with a 'name'"),
        ('[{"name": "a"}, {"name": "a"}]', "appears twice"),
        ('[{"name": "a", "ip": 5}]', "non-string ip"),
    ]:
        with pytest.raises(NodesFileError, match=message):
            parse_nodes(text)


def test_master_and_rotate_usage_errors_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = [
        (["master", "--local", str(tmp_path)], "--local needs --nodes FILE"),
        (["rotate", "--local", str(tmp_path / "nowhere")], "no local master state at"),
        (["status", "--local", str(tmp_path)], "no keyring under"),
        (
            ["master", "--local", str(tmp_path), "--nodes", str(tmp_path / "x.json")],
            "cannot read the node list",
        ),
    ]
    for args, message in cases:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("overlay-vici: ") and message in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as exc:
        main(["master", "--interval", "soon"])
    assert exc.value.code == 2


def test_a_second_local_master_on_the_same_state_refuses(tmp_path: Path) -> None:
    state = tmp_path / "state"
    nodes = nodes_file(tmp_path / "nodes.json")
    first = subprocess.Popen(
        [str(EXE), "master", "--local", str(state), "--nodes", str(nodes), "--tick", "0.2"],
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while not (secret_dir(state) / "keyring.json").exists():
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.1)
        second = subprocess.run(
            [str(EXE), "master", "--local", str(state), "--nodes", str(nodes)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert second.returncode == 2
        assert second.stderr == f"overlay-vici: another master already runs on {state}\n"
    finally:
        first.terminate()
        _, err = first.communicate(timeout=10)
    assert first.returncode == 0
    events = [json.loads(line)["event"] for line in err.decode().splitlines()]
    assert events[0] == "master starting" and "keyring created" in events
    assert events[-1] == "master stopped"
    assert not any("key" in json.loads(line) for line in err.decode().splitlines())


def test_the_agent_side_never_imports_kubernetes() -> None:
    """`kubernetes` is the [master] extra: the agent, the Lease edge and local mode do without."""
    code = (
        "import sys, overlay_vici.agent.agent, overlay_vici.cli, overlay_vici.reporter.lease, "
        "overlay_vici.master.local, overlay_vici.master.master, overlay_vici.master.rotation; "
        "sys.exit('kubernetes' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def keyring_of(state: Path) -> kr.Keyring:
    return kr.loads((secret_dir(state) / "keyring.json").read_text())


def status_view(state: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    assert main(["status", "--local", str(state), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_switch_file_drives_a_cutover_that_status_shows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    master = Master(LocalStore(state, nodes_file(tmp_path / "nodes.json")), QUICK)
    master.step()
    ack(state, "n1", "n2", "n3")
    assert main(["encryption", "off", "--local", str(state)]) == 0
    assert (state / "_master" / "enabled").read_text() == "false\n"
    master.step()
    assert keyring_of(state).encryption == kr.Encryption(False, None)
    view = status_view(state, capsys)
    assert view["encryption"] == {
        "enabled": False,
        "mode": "on",
        "at": None,
        "pending": True,
        "lagging": [],
    }
    assert view["waiting"] == ["n1", "n2", "n3"] and view["rotating"] is False
    assert main(["status", "--local", str(state)]) == 0
    assert "encryption on, switch to off announced, waiting for n1, n2, n3\n" in (
        capsys.readouterr().out
    )
    ack(state, "n1", "n2", "n3")
    master.step()
    at = keyring_of(state).encryption.at
    assert at is not None and at > time.time()
    view = status_view(state, capsys)
    assert view["encryption"] == {
        "enabled": False,
        "mode": "on",
        "at": at,
        "pending": True,
        "lagging": [],
    }
    assert main(["status", "--local", str(state)]) == 0
    assert "encryption on, switching off at " in capsys.readouterr().out
    time.sleep(max(0.0, at - time.time()) + 0.05)
    ack(state, "n1", "n2", encryption="off")
    ack(state, "n3", encryption="on")  # its agent has not acted on the moment yet
    view = status_view(state, capsys)
    assert view["encryption"] == {
        "enabled": False,
        "mode": "off",
        "at": at,
        "pending": False,
        "lagging": ["n3"],
    }
    assert [n["encryption"] for n in view["nodes"]] == ["off", "off", "on"]
    # A rotation asked for while off waits for encryption to be on again.
    assert main(["rotate", "--local", str(state)]) == 0
    master.step()
    assert phase(state) == "idle"
    assert main(["status", "--local", str(state)]) == 0
    text = capsys.readouterr().out
    assert "encryption off; agents not yet off: n3\n" in text
    assert "rotations wait until encryption is on" in text


def test_a_master_started_after_encryption_off_creates_the_mesh_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    assert main(["encryption", "off", "--local", str(state)]) == 0
    assert "follow the cutover with `overlay-vici status`" in capsys.readouterr().out
    Master(LocalStore(state, nodes_file(tmp_path / "nodes.json")), QUICK).step()
    assert keyring_of(state).encryption == kr.Encryption(False, 0.0)


def test_a_garbled_switch_file_keeps_the_switch_and_is_logged_once(
    local: tuple[Path, Path, Master], capsys: pytest.CaptureFixture[str]
) -> None:
    from overlay_vici.core import log

    log.setup("info")
    state, _, master = local
    master.step()
    (state / "_master" / "enabled").write_text("maybe\n")
    master.step()
    master.step()
    assert keyring_of(state).serial == 1
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    errors = [line for line in lines if line["level"] == "error"]
    assert [e["event"] for e in errors] == ["encryption switch unreadable, keeping the current one"]
    assert errors[0]["error"] == (
        f"{state / '_master' / 'enabled'} says 'maybe'; write true or false into it"
    )
    (state / "_master" / "enabled").write_text("FALSE")
    master.step()
    assert keyring_of(state).encryption == kr.Encryption(False, None)


def test_the_encryption_command_without_local_names_the_configmap_patch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["encryption", "on"]) == 2
    assert capsys.readouterr().err == (
        "overlay-vici: in Kubernetes the master follows the settings ConfigMap, so switch it "
        "there: kubectl -n overlay-vici patch configmap overlay-vici-config --type merge "
        """-p '{"data":{"enabled":"true"}}'\n"""
    )
    assert main(["encryption", "off", "--local", str(tmp_path / "nowhere")]) == 2
    assert "no local master state at" in capsys.readouterr().err


def test_status_names_the_nodes_whose_public_key_is_not_published_yet(
    local: tuple[Path, Path, Master], capsys: pytest.CaptureFixture[str]
) -> None:
    """The agents' reported keys reach the keyring; a node without one is named, with what
    it costs (no connection), and a key the master has not published yet shows as changed."""
    state, _, master = local
    master.step()
    pubs = {
        name: base64.b64encode(kr.public_bytes(kr.new_node_key())).decode() for name in ("n1", "n2")
    }
    ack(state, "n1", public_key=pubs["n1"])
    ack(state, "n2", public_key=pubs["n2"])
    master.step()
    keyring = kr.loads((secret_dir(state) / "keyring.json").read_text())
    assert [p.pub is not None for p in keyring.peers] == [True, True, False]
    ack(state, "n2", public_key=base64.b64encode(b"\x05" * 32).decode())  # not yet published
    capsys.readouterr()
    assert main(["status", "--local", str(state), "--json"]) == 0
    view = json.loads(capsys.readouterr().out)
    assert view["node_keys"] and view["without_public_key"] == ["n3"]
    assert [n["public_key"] for n in view["nodes"]] == ["published", "changed", "missing"]
    assert main(["status", "--local", str(state)]) == 0
    assert "no public key yet, so no connection to: n3" in capsys.readouterr().out
