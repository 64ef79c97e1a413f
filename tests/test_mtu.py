"""The tunl0 MTU that keeps IPIP inside transport-mode ESP (AES-GCM-128) within the link MTU."""

from __future__ import annotations

import pytest

from overlay_vici.mtu import ipip_mtu


def wire_size(inner: int) -> int:
    """Bytes on the wire for an inner packet: outer IPv4 20, ESP header 8, GCM IV 8,
    payload padded so payload + 2 trailer bytes is a multiple of 4, ICV 16."""
    padding = -(inner + 2) % 4
    return 20 + 8 + 8 + inner + padding + 2 + 16


@pytest.mark.parametrize(("external", "inner"), [(1500, 1446), (9000, 8946), (576, 522)])
def test_known_values(external: int, inner: int) -> None:
    """1500 gives 1446 (not 1452: that one is 1508 bytes on the wire)."""
    assert ipip_mtu(external) == inner
    assert wire_size(1452) == 1508


def test_largest_fitting_and_aligned_over_the_whole_range() -> None:
    """For every external MTU 576..9216: (size + 2) % 4 == 0, it fits, and nothing larger does."""
    for external in range(576, 9217):
        size = ipip_mtu(external)
        assert (size + 2) % 4 == 0
        assert wire_size(size) <= external
        assert all(wire_size(bigger) > external for bigger in range(size + 1, size + 9))


@pytest.mark.parametrize("external", [575, 68, 0, -1500])
def test_below_ipv4_minimum_raises(external: int) -> None:
    """Links below 576 bytes are refused with a message naming the value and the minimum."""
    with pytest.raises(ValueError, match=rf"^external MTU {external} is below the IPv4 minimum"):
        ipip_mtu(external)
