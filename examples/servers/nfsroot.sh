#!/bin/bash
# The paper's general-purpose servers, first approach: the file server of Figure 3 (two AoE disk
# nodes pooled with LVM2 into ext3) holds the full root and exports it over NFS on pnet; a server
# node boots it read-only (its writable parts in RAM); the principal logs in over ssh, runs
# python3 and `python3 -m http.server`, and a worker on pnet fetches the page.
#
#   examples/servers/nfsroot.sh [-u USER] [-c CREDFILE] [-i SSHKEY] [--disks N] [--login] [--keep]
#                               [--logs DIR] [--json]
#
# Needs a running service (kh service start; KH_STATE_DIR, KH_API_PORT, KH_SSH_PORT ... name
# another), 5 free nodes and root (khget speaks to khd's socket; kh publish). The nodes are
# released at the end, also on a failure or Ctrl-C; a failed run keeps the console logs.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
exec "${KH_PYTHON:-$repo/.venv/bin/python}" "$repo/examples/servers/servers.py" nfsroot "$@"
