#!/bin/bash
# `make demo`: boot a real ppce500 node through our U-Boot into the shell appliance and show it,
# then start the service and run the paper's web farm (examples/webfarm.sh) on COUNT nodes
# (default 2; `make demo COUNT=8`).
set -euo pipefail
cd "$(dirname "$0")/.."
KH=.venv/bin/kh
COUNT=${COUNT:-2}
case $COUNT in '' | *[!0-9]* | 0*) echo "demo: COUNT must be a number of nodes, not '$COUNT'" >&2; exit 2 ;; esac

echo "== kh images"
$KH images list
echo
echo "== booting one ppce500 node: QEMU -> our U-Boot -> run kboot -> Linux -> shell appliance"
start=$(date +%s.%N)
$KH boot --append "kh.hostname=demo-node" --sh 'uname -a; echo; head -n 4 /proc/cpuinfo; echo; free -m'
end=$(date +%s.%N)
printf '\n== node booted, ran the commands and was torn down in %.1f s\n\n' "$(echo "$end - $start" | bc)"

# The service, with a private state dir (mktemp: not a guessable path), a name prefix of this
# run's own (kh clean finds kh's objects by prefix: another kh on this host, or another demo, is
# never touched) and two free loopback ports; `kh clean` and the trap remove it all at the end,
# whether the demo passed or failed (khd's outside world, <prefix>-outside, with it).
KH_STATE_DIR=$(mktemp -d "${TMPDIR:-/tmp}/kh-demo.XXXXXXXX")
KH_PREFIX=kd$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
read -r KH_API_PORT KH_SSH_PORT < <(.venv/bin/python - <<'PY'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
PY
)
export KH_STATE_DIR KH_PREFIX KH_API_PORT KH_SSH_PORT
trap '$KH clean >/dev/null; rm -rf "$KH_STATE_DIR"' EXIT
quota=$([ "$COUNT" -le 16 ] || echo "--node-quota $COUNT")
echo "== kh service start --nodes $COUNT $quota (warm at the U-Boot prompt)"
# shellcheck disable=SC2086 # $quota: none or one option and its value
$KH service start --nodes "$COUNT" $quota
echo
echo "== the paper's Listing 1 as a web farm: $COUNT nodes boot the apache appliance (Apache httpd),"
echo "   their pages fetched from khd's outside world (khdo peripcmd runs there)"
export KH_CREDENTIAL=democred  # the credential itself, for khget and khdo: never on a command line
bash examples/webfarm.sh "$COUNT"
echo
echo "== kh clean"
$KH clean
rm -rf "$KH_STATE_DIR"
trap - EXIT
