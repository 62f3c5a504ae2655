"""khd's node backend (kh.hw.backend), as its configuration names it."""

from __future__ import annotations

from kh.hw.backend import Backend
from kh.hw.fabric import Fabric
from kh.service.config import ServiceConfig
from kh.service.nodes import NodeManager


def make_backend(cfg: ServiceConfig, fabric: Fabric) -> Backend:
    """``qemu`` (kh.service.nodes: khd runs each QEMU) unless ``cfg.backend`` is ``libvirt``
    (kh.service.libvirt_nodes, with kh's own libvirtd; imported only then, so the qemu
    backend needs no libvirt binding)."""
    if cfg.backend == "libvirt":
        from kh.service.libvirt_nodes import LibvirtNodes
        return LibvirtNodes(cfg, fabric)
    return NodeManager(cfg, fabric)
