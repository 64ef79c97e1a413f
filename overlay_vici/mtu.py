"""The largest pod MTU that fits IPIP inside transport-mode ESP with AES-GCM-128."""

IPIP_HEADER = 20
# ESP header (SPI, sequence) 8 + GCM IV 8 + trailer (pad length, next header) 2 + ICV 16.
ESP_GCM_OVERHEAD = 8 + 8 + 2 + 16
ESP_ALIGN = 4


def ipip_mtu(external_mtu: int) -> int:
    """Largest inner packet whose IPIP+ESP encapsulation fits `external_mtu`.

    ESP pads payload + 2 trailer bytes to a multiple of 4, so the result is the largest
    size <= external - 54 with (size + 2) % 4 == 0: 1500 gives 1446.
    """
    if external_mtu < 576:
        raise ValueError(f"external MTU {external_mtu} is below the IPv4 minimum of 576")
    room = external_mtu - IPIP_HEADER - ESP_GCM_OVERHEAD + 2
    return room - room % ESP_ALIGN - 2
