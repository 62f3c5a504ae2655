#!/bin/bash
# The paper's intranet (Figure 3) on a running khd, with the paper's own commands:
#   gw=$(khget -x -i -p 1 -c ./corp1cred corp1 1)        # gateway; its new domain is pnet
#   fs=$(khget -n $pnet -p 1 -c ./corp1cred corp1 1)     # file server; its new domain is disknet
#   ds=$(khget -i -n $pnet,$disknet -c ./corp1cred corp1 1)   # disk server (with a token)
#   khgetdisk 2                                          # on DS: two AoE disk nodes
#   w=$(khget -n $pnet -c ./corp1cred corp1 2)           # workers, the export mounted
# then every arrow of the figure checked (one line each), growth on demand under a writer
# (khgetdisk 2, vgextend + lvextend + resize2fs, 2 more workers), a report, and the teardown.
#
#   examples/intranet/run.sh [--dir DIR] [--keep | --down] [--no-growth] [--json]
#
# Needs root and a running khd with 12 free nodes (`kh service start --nodes 12`; KH_* variables
# name another one). DIR (default ./intranet) holds ./corp1cred and ./corp2cred (made, mode 600,
# if missing), report.txt, report.json and the console logs. See docs/scenarios.md.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
py=$repo/.venv/bin/python
[ -x "$py" ] || { echo "kh: $py is missing (make setup)" >&2; exit 1; }
exec "$py" -m kh.intranet "$@"
