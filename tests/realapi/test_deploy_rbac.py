"""deploy/ against a real API server: the server-side apply a user's install starts with, and
the accounts' permissions exactly as docs/security.md lists them, judged by the RBAC
authorizer itself (`kubectl auth can-i --as`)."""

from __future__ import annotations

import pytest
from control_plane import MANIFEST, NS, ControlPlane

MASTER = f"system:serviceaccount:{NS}:overlay-vici-master"
AGENT = f"system:serviceaccount:{NS}:overlay-vici-agent"

# (account, verb, resource, namespace or None for cluster scope, allowed)
PERMISSIONS = [
    (MASTER, "get", "nodes", None, True),
    (MASTER, "list", "nodes", None, True),
    (MASTER, "watch", "nodes", None, True),
    (MASTER, "create", "nodes", None, False),
    (MASTER, "update", "nodes/n1", None, False),
    (MASTER, "patch", "nodes/n1", None, False),
    (MASTER, "delete", "nodes/n1", None, False),
    (MASTER, "get", "secrets/overlay-vici-keys", NS, True),
    (MASTER, "update", "secrets/overlay-vici-keys", NS, True),
    (MASTER, "create", "secrets", NS, True),
    (MASTER, "get", "secrets/other", NS, False),
    (MASTER, "update", "secrets/other", NS, False),
    (MASTER, "list", "secrets", NS, False),
    (MASTER, "watch", "secrets", NS, False),
    (MASTER, "patch", "secrets/overlay-vici-keys", NS, False),
    (MASTER, "delete", "secrets/overlay-vici-keys", NS, False),
    (MASTER, "get", "secrets/overlay-vici-keys", "default", False),
    (MASTER, "get", "leases.coordination.k8s.io", NS, True),
    (MASTER, "list", "leases.coordination.k8s.io", NS, True),
    (MASTER, "watch", "leases.coordination.k8s.io", NS, True),
    (MASTER, "create", "leases.coordination.k8s.io", NS, True),
    (MASTER, "update", "leases.coordination.k8s.io", NS, True),
    (MASTER, "delete", "leases.coordination.k8s.io", NS, False),
    (MASTER, "create", "leases.coordination.k8s.io", "default", False),
    (MASTER, "create", "events", NS, True),
    (MASTER, "list", "pods", NS, False),
    (MASTER, "update", "configmaps/overlay-vici-config", NS, False),
    (AGENT, "get", "leases.coordination.k8s.io", NS, True),
    (AGENT, "create", "leases.coordination.k8s.io", NS, True),
    (AGENT, "update", "leases.coordination.k8s.io", NS, True),
    (AGENT, "list", "leases.coordination.k8s.io", NS, False),
    (AGENT, "delete", "leases.coordination.k8s.io", NS, False),
    (AGENT, "list", "daemonsets.apps/overlay-vici-agent", NS, True),
    (AGENT, "watch", "daemonsets.apps/overlay-vici-agent", NS, True),
    (AGENT, "list", "daemonsets.apps", NS, False),
    (AGENT, "get", "daemonsets.apps/overlay-vici-agent", NS, False),
    (AGENT, "delete", "daemonsets.apps/overlay-vici-agent", NS, False),
    (AGENT, "create", "events", NS, True),
    (AGENT, "get", "secrets/overlay-vici-keys", NS, False),
    (AGENT, "list", "secrets", NS, False),
    (AGENT, "get", "nodes", None, False),
    (AGENT, "patch", "nodes/n1", None, False),
]


def test_server_side_apply_creates_every_object_and_reapplies_cleanly(
    control_plane: ControlPlane, deployed: str
) -> None:
    applied = deployed.splitlines()
    assert applied and all(line.endswith(" serverside-applied") for line in applied), deployed
    kinds = {line.split("/")[0] for line in applied}
    assert {
        "namespace",
        "serviceaccount",
        "clusterrole.rbac.authorization.k8s.io",
        "role.rbac.authorization.k8s.io",
        "configmap",
        "deployment.apps",
        "daemonset.apps",
        "poddisruptionbudget.policy",
    } <= kinds
    again = control_plane.kubectl(
        "apply", "--server-side", "--field-manager=overlay-vici-test", "-f", str(MANIFEST)
    )
    assert again.stdout.splitlines() == applied
    listed = control_plane.kubectl("get", "-f", str(MANIFEST), "-o", "name").stdout.split()
    assert len(listed) == len(applied)


@pytest.mark.parametrize(("account", "verb", "resource", "namespace", "allowed"), PERMISSIONS)
def test_each_account_has_exactly_the_documented_permissions(
    control_plane: ControlPlane,
    deployed: str,
    account: str,
    verb: str,
    resource: str,
    namespace: str | None,
    allowed: bool,
) -> None:
    scope = ["-n", namespace] if namespace else []
    result = control_plane.kubectl(
        "auth", "can-i", verb, resource, *scope, f"--as={account}", check=False
    )
    answer = result.stdout.strip().split(" - ")[0]  # "no - REASON" when the server gives one
    assert answer == ("yes" if allowed else "no"), (result.stdout, result.stderr)
