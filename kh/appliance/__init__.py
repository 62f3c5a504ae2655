"""The appliance builder: a spec + the PPC root → a small cpio RAM disk wrapped for U-Boot."""
