"""`kh topo` and the live page's picture: the topology as data (model) and drawn (render)."""
