#!/bin/bash
# The paper's general-purpose servers, second approach: a disk node's RAM holds an ext3 copy of
# the full root (the rootdisk appliance unpacks the service's root.tar.gz, checked, and serves it
# with vblade on a private domain); a server node boots with that AoE disk as its read-write
# root (the aoeroot appliance); the principal logs in over ssh, runs python3 and
# `python3 -m http.server`, and a worker on pnet fetches the page.
#
#   examples/servers/aoeroot.sh [-u USER] [-c CREDFILE] [-i SSHKEY] [--disksize 160M] [--login]
#                               [--keep] [--logs DIR] [--json]
#
# Needs a running service (kh service start; KH_STATE_DIR, KH_API_PORT, KH_SSH_PORT ... name
# another), 3 free nodes and root (khget speaks to khd's socket; kh publish). The nodes are
# released at the end, also on a failure or Ctrl-C; a failed run keeps the console logs.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
exec "${KH_PYTHON:-$repo/.venv/bin/python}" "$repo/examples/servers/servers.py" aoeroot "$@"
