"""kh: IBM's Project Kittyhawk on one Linux host."""

__version__ = "0.1.0"
