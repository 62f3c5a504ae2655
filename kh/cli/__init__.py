"""Command-line front ends: thin wrappers that parse, call the library and print."""
