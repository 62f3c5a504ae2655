#!/bin/bash
# `make demo`: boot a real ppce500 node through our U-Boot into the shell appliance and show it.
set -euo pipefail
cd "$(dirname "$0")/.."
KH=.venv/bin/kh

echo "== kh images"
$KH images list
echo
echo "== booting one ppce500 node: QEMU -> our U-Boot -> run kboot -> Linux -> shell appliance"
start=$(date +%s.%N)
$KH boot --append "kh.hostname=demo-node" -- 'uname -a; echo; cat /proc/cpuinfo | head -n 4; echo; free -m; echo; ls /'
end=$(date +%s.%N)
printf '\n== node booted, ran the commands and was torn down in %.1f s\n' "$(echo "$end - $start" | bc)"
