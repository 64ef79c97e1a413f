"""What only a distribution kernel can show (qemu guest, scripts/qemu-guest; skipped in UML):
the `modules` init container's modprobe from /lib/modules, and the guard choosing nf_tables
by itself on a node whose Calico rules are in iptables-nft.

The fault table and the mesh tests run here too, with the guards in either backend
(FELIX_IPTABLESBACKEND=nft|legacy): scripts/qemu-lab.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
import yaml
from cluster import status
from faultbed import FAST, Observation, assert_no_plaintext, bed_of, restart_charon
from mesh import Mesh

ROOT = Path(__file__).resolve().parents[2]
GUEST_RUN = Path("/run/uml-guest")  # where tests/uml/init.sh left the init container's output

pytestmark = pytest.mark.skipif(
    os.environ.get("OVERLAY_VICI_GUEST") != "qemu",
    reason="needs a distribution kernel: scripts/qemu-guest (the UML kernel has no nf_tables "
    "and its modules are not in /lib/modules)",
)

# What Calico's Felix keeps in iptables-nft on a node in IPIP mode (abridged from a real
# node: its jumps first in the built-in chains, the IPIP ACCEPTs in filter that the guard must
# not sit behind); the host addresses stand in for Felix's all-hosts ipset.
CALICO_NFT_RULES = "\n".join(
    [
        "*raw",
        ":cali-PREROUTING - [0:0]",
        ":cali-OUTPUT - [0:0]",
        '-A PREROUTING -m comment --comment "cali:6gwbT8clXdHdC1b1" -j cali-PREROUTING',
        '-A OUTPUT -m comment --comment "cali:tVnHkvAo15HuiPy0" -j cali-OUTPUT',
        "-A cali-PREROUTING -j MARK --set-xmark 0x0/0xf0000",
        "-A cali-OUTPUT -j MARK --set-xmark 0x0/0xf0000",
        "COMMIT",
        "*mangle",
        ":cali-PREROUTING - [0:0]",
        '-A PREROUTING -m comment --comment "cali:6gwbT8clXdHdC1b1" -j cali-PREROUTING',
        "-A cali-PREROUTING -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "COMMIT",
        "*filter",
        ":cali-INPUT - [0:0]",
        ":cali-OUTPUT - [0:0]",
        '-A INPUT -m comment --comment "cali:Cz_u1IQiXIMmKD4c" -j cali-INPUT',
        '-A OUTPUT -m comment --comment "cali:tVnHkvAo15HuiPy0" -j cali-OUTPUT',
        '-A cali-INPUT -p ipencap -s 10.99.0.0/24 -m comment --comment "Allow IPIP packets '
        'from Calico hosts" -m addrtype --dst-type LOCAL -j ACCEPT',
        '-A cali-INPUT -p ipencap -m comment --comment "Drop IPIP packets from non-Calico '
        'hosts" -j DROP',
        "-A cali-OUTPUT -m mark --mark 0x10000/0x10000 -j ACCEPT",
        '-A cali-OUTPUT -p ipencap -d 10.99.0.0/24 -m comment --comment "Allow IPIP packets '
        'to other Calico hosts" -m addrtype --src-type LOCAL -j ACCEPT',
        "COMMIT",
        "",
    ]
)


def init_container_modules() -> tuple[list[str], list[str]]:
    """The modules the `modules` init container requires, and those it loads if it can."""
    for doc in yaml.safe_load_all((ROOT / "deploy" / "overlay-vici.yaml").read_text()):
        for container in (
            (doc or {})
            .get("spec", {})
            .get("template", {})
            .get("spec", {})
            .get("initContainers", [])
        ):
            if container["name"] == "modules":
                script = container["command"][2]
                loop = r"for module in ([^;]+); do\s+modprobe (-\w)"
                loops = {flag: names.split() for names, flag in re.findall(loop, script)}
                return loops["-v"], loops["-q"]
    raise AssertionError("no modules init container in deploy/overlay-vici.yaml")


def test_the_init_containers_modprobe_loads_every_module_from_lib_modules() -> None:
    """The guest's init ran the init container's script before anything else loaded modules;
    every module it names, required or optional, is in this distribution kernel."""
    required, optional = init_container_modules()
    log = (GUEST_RUN / "modules.log").read_text()
    assert (GUEST_RUN / "modules.status").read_text().strip() == "0", log
    release = os.uname().release
    for name in required:  # modprobe -v shows where each came from
        where = rf"^insmod /lib/modules/{re.escape(release)}/\S+/{name}\.ko"
        assert re.search(where, log, re.M), log
    assert "not loaded" not in log
    loaded = {name for name in required + optional if Path("/sys/module", name).is_dir()}
    assert loaded == set(required + optional)


def seed_calico_nft_rules(mesh: Mesh) -> None:
    for node in mesh.nodes:
        node.run(["iptables-nft-restore", "--noflush"], stdin=CALICO_NFT_RULES)
        node.guard_backend = "nft"  # where the guard should go by itself


def test_the_guard_picks_nft_beside_calicos_rules_and_holds_on_charon_sigterm(
    tmp_path: Path,
) -> None:
    """Agents with --iptables-backend auto on nodes whose Calico rules are in iptables-nft
    put the guard in nft (legacy is empty then; the test counters go there later); when
    charon stops gracefully, the nft guard drops the IPIP that would leave in plaintext,
    behind Calico's own ACCEPT of IPIP in filter."""
    with bed_of(tmp_path, [*FAST, "--iptables-backend", "auto"], seed_calico_nft_rules) as bed:
        nodes = bed.mesh.nodes
        assert {n.name: (status(n) or {}).get("guard", {}).get("backend") for n in nodes} == {
            n.name: "nft" for n in nodes
        }
        assert all(n.guarded() for n in nodes)
        assert not any("OVERLAY-VICI" in n.run(["iptables-legacy-save"]).stdout for n in nodes)
        seen = Observation(bed.mesh)
        restart_charon(nodes[1], signal.SIGTERM)
        result = seen.finish("charon SIGTERM and restart (n2), guard put in nft by auto")
        assert_no_plaintext(result)
        assert result.guard_drops > 0, "charon's policies were gone: the guard must have dropped"
