#!/bin/bash
# `make demo`: boot a real ppce500 node through our U-Boot into the shell appliance and show it,
# then run the service: a principal allocates two nodes in its private domain.
set -euo pipefail
cd "$(dirname "$0")/.."
KH=.venv/bin/kh
KHGET=.venv/bin/khget

echo "== kh images"
$KH images list
echo
echo "== booting one ppce500 node: QEMU -> our U-Boot -> run kboot -> Linux -> shell appliance"
start=$(date +%s.%N)
$KH boot --append "kh.hostname=demo-node" -- 'uname -a; echo; head -n 4 /proc/cpuinfo; echo; free -m'
end=$(date +%s.%N)
printf '\n== node booted, ran the commands and was torn down in %.1f s\n\n' "$(echo "$end - $start" | bc)"

# The service, with a state dir and name prefix of the demo's own, removed again at the end.
export KH_STATE_DIR=/tmp/kh-demo-state KH_PREFIX=khdemo KH_API_PORT=7490
trap '$KH clean >/dev/null' EXIT
echo "== kh service start (4 nodes, warm at the U-Boot prompt)"
$KH service start --nodes 4
echo
echo "== khget -c democred alice 2"
$KHGET -c democred alice 2
echo
echo "== kh ps"
$KH ps
echo
echo "== node 1's console (what khd logged): the U-Boot environment khget set"
sleep 0.5
tail -c 600 "$KH_STATE_DIR/logs/node1.log" | tr -d '\r' | tail -n 4
echo
echo "== kh hw"
$KH hw
echo
echo "== kh clean"
$KH clean
trap - EXIT
