# kh's QEMU for its nodes (images/recipes/qemu.toml): the devices of a ppce500 node and
# nothing else. Built with --without-default-devices, so only these and what they select.
# The board: ppce500 (e500 core, OpenPIC, the e500 PCI host, the 16550 console, eTSEC, ...)
CONFIG_E500PLAT=y
# kh's NICs (virtio-net-pci) and the free page reporting balloon (virtio-balloon-pci)
CONFIG_VIRTIO_PCI=y
CONFIG_VIRTIO_NET=y
CONFIG_VIRTIO_BALLOON=y
# -device loader (kh boot --load; khd writes images through the memfd instead)
CONFIG_GENERIC_LOADER=y
