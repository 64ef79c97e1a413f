"""overlay-vici: IPsec for Calico IPIP pod traffic, driven through strongSwan's VICI."""
