"""The harness itself, with hand-written swanctl.conf files and no overlay_vici code.

Proves what the agent's tests rely on: Calico-style IPIP between the nodes, charon per node,
transport-mode ESP that carries all IPIP, and counters that tell plaintext IPIP from ESP.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from mesh import Mesh, Node, default_strongswan_conf, ping_once

PSK = "harness-smoke-test-psk"
PROBE_SECONDS = 3.0


def swanctl_conf(node: Node, peers: Sequence[Node]) -> str:
    """IKEv2 PSK per peer pair with one transport-mode CHILD_SA for all IPIP, started on demand."""
    sections = []
    for peer in peers:
        sections.append(f"""\
connections {{
    {peer.name} {{
        version = 2
        local_addrs = {node.ip}
        remote_addrs = {peer.ip}
        mobike = no
        encap = no
        proposals = aes128gcm16-prfsha256-x25519
        local {{
            auth = psk
            id = {node.ip}
        }}
        remote {{
            auth = psk
            id = {peer.ip}
        }}
        children {{
            {peer.name} {{
                mode = transport
                local_ts = dynamic[ipencap]
                remote_ts = dynamic[ipencap]
                esp_proposals = aes128gcm16-x25519
                start_action = trap
            }}
        }}
    }}
}}
secrets {{
    ike-{peer.name} {{
        id-local = {node.ip}
        id-remote = {peer.ip}
        secret = {PSK}
    }}
}}
""")
    return "".join(sections)


def test_transport_esp_carries_all_ipip(mesh3: Mesh) -> None:
    nodes = mesh3.nodes
    mesh3.install_ipip_counters()

    # Before any IPsec, IPIP crosses in plaintext, and the counter sees it.
    assert ping_once(nodes[0], nodes[1], count=2).received == 2
    assert mesh3.read_counters()["n2"].plain_ipip >= 2

    for node in nodes:
        node.start_charon(default_strongswan_conf(node.vici_socket, node.charon_log))
    for node in nodes:
        node.wait_vici()
        conf = node.dir / "swanctl.conf"
        conf.write_text(swanctl_conf(node, [peer for peer in nodes if peer is not node]))
        node.swanctl("--load-all", "--file", str(conf))

    # A trap policy drops the packet that starts IKE, so wait for the first reply.
    for src in nodes:
        for dst in nodes:
            if src is not dst:
                assert ping_once(src, dst, timeout=10).received == 1, f"{src.name} -> {dst.name}"

    for node in nodes:
        sas = node.swanctl("--list-sas")
        assert sas.count("INSTALLED, TRANSPORT, ESP:AES_GCM_16-128") == 2, sas
        for peer in nodes:
            if peer is not node:
                assert f"remote {peer.ip}/32[ipencap]" in sas, sas

    mesh3.reset_counters()
    capture = mesh3.capture()
    pinger = mesh3.pinger()
    pinger.start()
    time.sleep(PROBE_SECONDS)
    stats = pinger.stop()
    wire = capture.stop()
    counters = mesh3.read_counters()

    for (src, dst), pair in stats.items():
        assert pair.sent >= 10 and pair.lost == 0, f"{src} -> {dst}: {pair}"
    for name, counted in counters.items():
        # Every answered probe brought one ESP packet to each end (request, reply).
        answered = sum(pair.received for (src, dst), pair in stats.items() if name in (src, dst))
        assert counted.plain_ipip == 0, f"{name}: {counted}"
        assert counted.esp >= answered, f"{name}: {counted}, {answered} probes answered"
    assert wire["esp"] > 0 and wire["ipip"] == 0, wire

    # Node-to-node traffic is no IPIP: it matches no policy and goes as plain ICMP, no ESP.
    before = mesh3.read_counters()
    assert ping_once(nodes[0], nodes[1], count=3, underlay=True).received == 3
    assert mesh3.read_counters() == before


def test_nodes_join_and_leave(mesh3: Mesh) -> None:
    n1, n2, _ = mesh3.nodes
    n4 = mesh3.add_node()
    assert n4.name == "n4"
    assert ping_once(n1, n4).received == 1
    assert ping_once(n4, n2).received == 1

    mesh3.remove_node(n2)
    assert n2.pod_cidr not in n1.run(["ip", "route"]).stdout
    assert ping_once(n4, n1).received == 1
