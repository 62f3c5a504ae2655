"""Hardware: one node's QEMU command line (board), its process (qemu), its serial (console)."""
