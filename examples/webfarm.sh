#!/bin/bash
# The paper's Listing 1 as a web farm: COUNT nodes (default 1) in the external domain boot the
# apache appliance, and each one's page is fetched from the outside world.
#
#   examples/webfarm.sh [COUNT] [--keep] [-c FILE]
#
# COUNT is the only thing that changes between 1 and 64 ("simply replacing the value of 1 in the
# khget command to 100 would launch 100 Apache instances with no other changes"). The principal
# is $USER; its credential is in FILE (-c) or is KH_CREDENTIAL itself, never on a command line.
# It needs a running khd (`kh service start`), found as khget finds it (KH_STATE_DIR, KH_PREFIX,
# KH_SSH_PORT); the pages are fetched where khdo's peripcmd runs (the outside world).
#
# Prints each node's page, then `COUNT/COUNT pages in T s` (T: from khget to the last page),
# and releases the nodes (--keep leaves them and says how to release them). Exit status 0 when
# every node served its page. KH_WEBFARM_WAIT: seconds the pages may take (default 180 + 15 per
# node: 64 nodes boot on 2 cores one after another's share).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
PATH=$repo/.venv/bin:$PATH
USER=${USER:-$(id -un)}

usage() {
	echo "usage: examples/webfarm.sh [COUNT] [--keep] [-c FILE]" >&2
	exit "${1:-2}"
}
count=1 keep=0 cred=()
while [ $# -gt 0 ]; do
	case $1 in
	--keep) keep=1 ;;
	-c) [ $# -ge 2 ] || usage; cred=(-c "$2"); shift ;;
	-h | --help) usage 0 ;;
	'' | *[!0-9]* | 0*) usage ;;
	*) count=$1 ;;
	esac
	shift
done
if [ ${#cred[@]} -eq 0 ] && [ -z "${KH_CREDENTIAL:-}" ]; then
	echo "webfarm: no credential for $USER (-c FILE, a file holding it, or KH_CREDENTIAL)" >&2
	exit 2
fi
if ! err=$(kh service status 2>&1 >/dev/null); then
	echo "$err" >&2
	quota=$([ "$count" -le 16 ] || echo " --node-quota $count")
	echo "webfarm: it needs a running khd; start one (as root): kh service start --nodes $count$quota" >&2
	exit 1
fi
wait=${KH_WEBFARM_WAIT:-$((180 + 15 * count))}
cd "${KH_IMAGES_OUT:-$repo/images/out}"  # ./uImage and ./apache.cpio.gz.uimg, as in Listing 1

log=$(mktemp) channel= poller=
cleanup() {
	[ -z "$poller" ] || { kill "$poller" 2>/dev/null; wait "$poller" 2>/dev/null || true; }
	if [ -n "$channel" ] && [ "$keep" = 0 ]; then
		kh release -u "$USER" "${cred[@]}" "$channel" >/dev/null ||
			echo "webfarm: $channel was not released (kh ps -u $USER shows it)" >&2
	elif [ -n "$channel" ]; then
		echo "kept: $channel (release it: kh release -u $USER $channel)"
	fi
	rm -f "$log"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
show() { printf '> %s\n' "$1"; }
khdo_() { printf '%s\n' "$nodes" | khdo "${cred[@]}" "$@"; }
fail() {
	echo "webfarm: $1 failed:" >&2
	tail -n 20 "$log" >&2
	exit 1
}

start=$EPOCHREALTIME
show "nodes=\$(khget -x \$USER $count)"
nodes=$(khget "${cred[@]}" -x "$USER" "$count")
channel=${nodes%%@*}  # the first line is the channel, con<ID>@host; kh release takes con<ID>
show 'echo "$nodes" | khdo loadkernel ./uImage'
khdo_ loadkernel ./uImage >/dev/null 2>"$log" || fail loadkernel
show 'echo "$nodes" | khdo loadramdisk ./apache.cpio.gz.uimg'
khdo_ loadramdisk ./apache.cpio.gz.uimg >/dev/null 2>"$log" || fail loadramdisk
show 'echo "$nodes" | khdo write "run kboot"'
khdo_ write "run kboot" >/dev/null 2>"$log" || fail "write run kboot"
# Every node's page at once (peripcmd runs the nodes' commands side by side), each retried
# until its Apache answers: the node may still be booting (no ARP answer, or connection refused).
# In the background, so that a SIGTERM to this script is acted on at once (khdo ends its
# commands on SIGTERM).
show 'echo "$nodes" | khdo peripcmd "wget -qO- http://%ip%/"'
khdo_ peripcmd "timeout $wait wget -qO- --tries=0 --retry-connrefused --waitretry=1 \
--connect-timeout=1 --read-timeout=10 http://%ip%/" >/dev/null 2>"$log" &
poller=$!
wait "$poller" || true
poller=
end=$EPOCHREALTIME
cat "$log"
got=$(grep -o '<h1>[^<]*</h1>' "$log" | sort -u | wc -l)
awk -v got="$got" -v n="$count" -v a="$start" -v b="$end" \
	'BEGIN { printf "%d/%d pages in %.1f s\n", got, n, b - a }'
[ "$got" -eq "$count" ]
