"""The control channel: an allocation's nodes' consoles behind one ssh endpoint."""
