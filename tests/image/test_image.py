"""The built image, run the way deploy/overlay-vici.yaml runs it (scripts/image builds it).

Every container of the manifest runs in the image with its securityContext (user,
capabilities, no privilege escalation, read-only root filesystem) and its volumes at
their mountPaths: emptyDirs as host directories shared by the pod's containers, the
Secret and the ConfigMap as their files, hostPath as is. With the root read-only, any
write outside a volume fails, so a container that does its job proves the manifest's
volumes cover what it writes. The agent pod's containers share one network namespace
(hostNetwork in the cluster; a private one here, held by a sleeping container).
podman runs them, with scripts/containers.conf.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from keyring_fixtures import build_keyring
from test_deploy import ROOT, container, containers, env_values, expand, the

from overlay_vici.core.contract import KEYRING_FILE, conn_name
from overlay_vici.core.files import publish_secret
from overlay_vici.core.keyring import dumps

pytestmark = pytest.mark.image

IMAGE = os.environ.get("OVERLAY_VICI_IMAGE", "")
PODMAN_ENV = {**os.environ, "CONTAINERS_CONF": str(ROOT / "scripts" / "containers.conf")}
READY_WITHIN = 30.0
WRITE_ERRORS = re.compile(r"Read-only file system|EROFS|unable to create pidfile", re.I)


def podman(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], env=PODMAN_ENV, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def run_image(*args: str, entrypoint: str | None = None) -> subprocess.CompletedProcess[str]:
    """One command in the image as a plain `docker run` would start it, but read-only."""
    override = ["--entrypoint", entrypoint] if entrypoint else []
    return podman("run", "--rm", "--network", "none", "--read-only", "--read-only-tmpfs=false",
                  *override, IMAGE, *args)  # fmt: skip


# --- the manifest's pods, as podman arguments -----------------------------------------------


def pod_volumes(workload: dict[str, Any], where: Path) -> dict[str, Path]:
    """A host directory (or the hostPath itself) for each of the pod's volumes, filled as
    kubelet would: a keyring for node-0 in the Secret, the ConfigMap's items."""
    config = the("ConfigMap", "overlay-vici-config")["data"]
    volumes = {}
    for volume in workload["spec"]["template"]["spec"]["volumes"]:
        path = where / volume["name"]
        if volume.get("hostPath", {}).get("type") == "FileOrCreate":
            path.touch()  # a file kubelet would create: this test's own, not the host's
        elif volume.get("hostPath", {}).get("type") == "DirectoryOrCreate":
            path.mkdir(mode=0o755)  # as kubelet creates it (the node key's, kept per node)
        elif "hostPath" in volume:
            path = Path(volume["hostPath"]["path"])
        elif "emptyDir" in volume:
            path.mkdir(mode=0o777)
            path.chmod(0o777)  # as kubelet makes it: writable by every uid
        elif "secret" in volume:
            assert [i["key"] for i in volume["secret"]["items"]] == [KEYRING_FILE]
            publish_secret(path, {KEYRING_FILE: dumps(build_keyring(3))})
            (path / "..data" / KEYRING_FILE).chmod(volume["secret"]["defaultMode"])
        elif "configMap" in volume:
            path.mkdir()
            for item in volume["configMap"]["items"]:
                (path / item["path"]).write_text(config[item["key"]])
        else:  # the projected API token: report-lease stops before it would read it
            path.mkdir()
            for name in ("token", "ca.crt", "namespace"):
                (path / name).write_text("")
        volumes[volume["name"]] = path
    return volumes


def podman_args(workload: dict[str, Any], name: str, volumes: dict[str, Path]) -> list[str]:
    """`podman run` arguments (before the image) and the arguments after it, for one of
    the workload's containers, from its manifest entry."""
    c = container(workload, name)
    pod_security = workload["spec"]["template"]["spec"].get("securityContext", {})
    security = {**pod_security, **c["securityContext"]}
    user = str(security["runAsUser"])
    if "runAsGroup" in security:
        user += f":{security['runAsGroup']}"
    args = ["--user", user, "--cap-drop", "ALL"]
    args += [f"--cap-add={cap}" for cap in security["capabilities"].get("add", [])]
    if security["allowPrivilegeEscalation"] is False:
        args += ["--security-opt", "no-new-privileges"]
    if security["readOnlyRootFilesystem"]:
        args += ["--read-only", "--read-only-tmpfs=false"]
    for mount in c.get("volumeMounts", []):
        mode = "ro" if mount.get("readOnly") else "rw"
        args += ["--volume", f"{volumes[mount['name']]}:{mount['mountPath']}:{mode}"]
    env = env_values(c)
    for variable, value in env.items():
        args += ["--env", f"{variable}={value}"]
    command = expand(c["command"], env)
    return [*args, "--entrypoint", json.dumps(command), IMAGE, *expand(c.get("args", []), env)]


class Pod:
    """One workload's containers in podman; all removed at the end."""

    def __init__(self, workload: dict[str, Any], where: Path) -> None:
        self.workload = workload
        self.volumes = pod_volumes(workload, where)
        self.prefix = f"ovtest-{os.getpid()}-{workload['metadata']['name']}"
        self.network = ["--network", "none"]
        self.started: list[str] = []

    def share_network(self) -> None:
        """A sleeping container holds the namespace that the pod's containers join."""
        holder = self.start_plain("netns", "--network", "none", "--entrypoint", "sleep", IMAGE,
                                  "infinity")  # fmt: skip
        self.network = ["--network", f"container:{holder}"]

    def start_plain(self, name: str, *args: str) -> str:
        full = f"{self.prefix}-{name}"
        started = podman("run", "--detach", "--name", full, "--read-only",
                         "--read-only-tmpfs=false", *args)  # fmt: skip
        assert started.returncode == 0, started.stderr
        self.started.append(full)
        return full

    def run(self, name: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """The container to its end, as an init container runs."""
        args = podman_args(self.workload, name, self.volumes)
        return podman("run", "--rm", *self.network, *args, timeout=timeout)

    def start(self, name: str) -> str:
        return self.start_plain(name, *self.network, *podman_args(self.workload, name,
                                                                   self.volumes))  # fmt: skip

    def probe(self, name: str, kind: str) -> subprocess.CompletedProcess[str]:
        command = container(self.workload, name)[f"{kind}Probe"]["exec"]["command"]
        return podman("exec", f"{self.prefix}-{name}", *command, timeout=10)

    def wait_ready(self, name: str) -> subprocess.CompletedProcess[str]:
        deadline = time.monotonic() + READY_WITHIN
        while True:
            probe = self.probe(name, "readiness")
            if probe.returncode == 0 or time.monotonic() > deadline:
                return probe
            time.sleep(0.5)

    def logs(self, name: str) -> str:
        logs = podman("logs", f"{self.prefix}-{name}")
        return logs.stdout + logs.stderr

    def running(self, name: str) -> bool:
        state = podman("inspect", "--format", "{{.State.Running}}", f"{self.prefix}-{name}")
        return state.stdout.strip() == "true"

    def remove(self) -> None:
        """Last started first: podman keeps the namespace holder while others use it."""
        for name in reversed(self.started):
            removed = podman("rm", "--force", "--time", "0", name)
            assert removed.returncode == 0, removed.stderr


@pytest.fixture
def agent_pod(tmp_path: Path) -> Iterator[Pod]:
    pod = Pod(the("DaemonSet", "overlay-vici-agent"), tmp_path)
    yield pod
    pod.remove()


def charon_path() -> str:
    """The charon binary the agent pod's charon container execs."""
    script = container(the("DaemonSet", "overlay-vici-agent"), "charon")["command"][2]
    found = re.search(r"^\s*exec (\S+)\s*$", script, re.M)
    assert found, "the charon container's script ends in exec CHARON"
    return found[1]


# --- the image's commands -------------------------------------------------------------------


def test_the_default_command_is_the_clis_help_as_the_manifests_non_root_user() -> None:
    help_text = run_image()
    assert help_text.returncode == 0, help_text.stderr
    assert help_text.stdout.startswith("usage: overlay-vici")
    user = podman("image", "inspect", "--format", "{{.Config.User}}", IMAGE).stdout.strip()
    master = the("Deployment", "overlay-vici-master")["spec"]["template"]["spec"]
    uid, gid = master["securityContext"]["runAsUser"], master["securityContext"]["runAsGroup"]
    assert user == f"{uid}:{gid}"
    ids = run_image("-c", "id -u; id -g", entrypoint="sh")
    assert ids.stdout.split() == [str(uid), str(gid)], ids.stderr


def test_charon_is_strongswan_5_9_8_at_the_path_the_manifest_runs() -> None:
    version = run_image("--version", entrypoint=charon_path())
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == "Linux strongSwan 5.9.8"


def test_render_finds_the_installed_templates() -> None:
    socket = "/run/overlay-vici/charon.vici"
    conf = run_image("render", "strongswan", "--vici-socket", socket)
    assert conf.returncode == 0, conf.stderr
    assert f"unix://{socket}" in conf.stdout
    swanctl = run_image("render", "swanctl", "--node", "node-0", "--keys", "/nonexistent")
    assert swanctl.returncode == 2
    assert swanctl.stderr.startswith("overlay-vici: ") and swanctl.stderr.count("\n") == 1


def test_master_help_and_no_compiler_in_the_image() -> None:
    help_text = run_image("master", "--help")
    assert help_text.returncode == 0, help_text.stderr
    assert help_text.stdout.startswith("usage: overlay-vici master")
    compilers = run_image("-c", "command -v gcc cc c++ clang || true", entrypoint="sh")
    assert compilers.returncode == 0 and compilers.stdout == ""


# --- the manifest's containers --------------------------------------------------------------


def test_the_master_container_needs_only_its_volumes_and_says_what_is_missing(
    tmp_path: Path,
) -> None:
    """Outside a cluster it stops at its first API access, with the one-sentence error."""
    pod = Pod(the("Deployment", "overlay-vici-master"), tmp_path)
    master = pod.run("master")
    assert master.returncode == 2, master.stdout + master.stderr
    assert re.fullmatch(r"overlay-vici: no Kubernetes configuration found \(.*\); "
                        r"pass --kubeconfig\n", master.stderr), master.stderr  # fmt: skip


def test_the_agent_pods_containers_run_on_a_read_only_root(agent_pod: Pod) -> None:
    """The init containers to their end, then charon and the agent until both are ready
    (charon's VICI socket in the shared volume, the agent's report there too, the probes
    as declared), then report-lease, which stops for want of a cluster."""
    modules = agent_pod.run("modules")
    release = os.uname().release
    if not Path(f"/lib/modules/{release}").exists():
        assert modules.returncode == 1
        assert f"Module xfrm_user not found in directory /lib/modules/{release}" in modules.stderr
    assert not WRITE_ERRORS.search(modules.stdout + modules.stderr), modules.stderr

    agent_pod.share_network()
    guard = agent_pod.run("guard")
    assert guard.returncode == 0 and guard.stdout.startswith("guard installed ("), (
        guard.stdout + guard.stderr
    )

    agent_pod.start("charon")
    socket = agent_pod.volumes["run"] / "charon.vici"
    charon = agent_pod.wait_ready("charon")
    assert charon.returncode == 0, charon.stderr + agent_pod.logs("charon")
    assert stat.S_ISSOCK(socket.stat().st_mode)
    version = podman("exec", f"{agent_pod.prefix}-charon", "swanctl", "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("strongSwan swanctl 5.9.8"), version.stdout

    agent_pod.start("agent")
    ready = agent_pod.wait_ready("agent")
    assert ready.returncode == 0, ready.stderr + agent_pod.logs("agent")
    for name in ("charon", "agent"):
        live = agent_pod.probe(name, "liveness")
        assert live.returncode == 0, (name, live.stderr)
    status = json.loads((agent_pod.volumes["run"] / "status.json").read_text())
    assert status["last_error"] is None and status["keyring_serial"] == 1, status
    assert status["guard"]["installed"], status["guard"]
    conns = podman("exec", f"{agent_pod.prefix}-charon", "swanctl", "--list-conns")
    assert conn_name("node-1") in conns.stdout and conn_name("node-2") in conns.stdout

    lease = agent_pod.run("report-lease")
    assert lease.returncode == 2
    assert lease.stderr == (
        "overlay-vici: not in a pod (no KUBERNETES_SERVICE_HOST); pass --server\n"
    )

    for name in ("charon", "agent"):
        assert agent_pod.running(name), agent_pod.logs(name)
        assert not WRITE_ERRORS.search(agent_pod.logs(name)), agent_pod.logs(name)


def test_every_container_of_the_manifest_is_run_here() -> None:
    """A container added to the manifest must be added to the tests above."""
    run_here = {"master", "modules", "guard", "charon", "agent", "report-lease"}
    workloads = [the("Deployment", "overlay-vici-master"), the("DaemonSet", "overlay-vici-agent")]
    in_manifest = {c["name"] for workload in workloads for c in containers(workload)}
    assert in_manifest == run_here
