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
$KH boot --append "kh.hostname=demo-node" --sh 'uname -a; echo; head -n 4 /proc/cpuinfo; echo; free -m'
end=$(date +%s.%N)
printf '\n== node booted, ran the commands and was torn down in %.1f s\n\n' "$(echo "$end - $start" | bc)"

# The service, with a private state dir (mktemp: not a guessable path), a name prefix of this
# run's own (kh clean finds kh's objects by prefix: another kh on this host, or another demo, is
# never touched) and two free loopback ports; `kh clean` and the trap remove it all at the end,
# whether the demo passed or failed.
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
echo "== kh service start (4 nodes, warm at the U-Boot prompt)"
$KH service start --nodes 4
echo
echo "== the paper's Listing 1 with the shell appliance: khget, khdo loadkernel, loadramdisk, run kboot"
KHDO=.venv/bin/khdo
export KH_CREDENTIAL=democred  # the credential itself, for khget and khdo: never on a command line
nodes=$($KHGET alice 2)
echo "$nodes"
echo "$nodes" | $KHDO loadkernel images/out/uImage >/dev/null
echo "$nodes" | $KHDO loadramdisk images/out/shell.cpio.gz.uimg >/dev/null
echo "$nodes" | $KHDO write "run kboot" >/dev/null 2>&1
echo
echo "== every node answers on the control channel (ssh con<ID>@127.0.0.1 -p $KH_SSH_PORT)"
for _ in $(seq 1 30); do
	out=$(echo "$nodes" | $KHDO write 'uname -a; ip -4 -o addr show eth0' 2>&1 >/dev/null | tr -d '\r')
	[ "$(echo "$out" | grep -c '^Linux')" -ge 2 ] && break
	sleep 1
done
echo "$out" | grep -E '^(Linux|[0-9]+: eth0)'
echo
echo "== the web farm: two more nodes on the public domain boot the apache appliance (Apache httpd)"
web=$($KHGET -i alice 2)
echo "$web" | $KHDO loadkernel images/out/uImage >/dev/null
echo "$web" | $KHDO loadramdisk images/out/apache.cpio.gz.uimg >/dev/null
echo "$web" | $KHDO write "run kboot" >/dev/null 2>&1
# Fetched from the fabric's namespace, where the service sits on the public domain.
for _ in $(seq 1 30); do
	pages=$(echo "$web" | KHDO_NETNS=$KH_PREFIX-fabric $KHDO peripcmd \
		'wget -q -T 2 -O - http://%ip%/' 2>&1 >/dev/null || true)
	[ "$(echo "$pages" | grep -c '<h1>')" -ge 2 ] && break
	sleep 1
done
echo "$pages" | grep -E '<h1>|apache appliance'
echo
echo "== kh ps"
$KH ps
echo
echo "== kh hw"
$KH hw
echo
echo "== kh clean"
$KH clean
rm -rf "$KH_STATE_DIR"
trap - EXIT
