#!/bin/sh
# udhcpc event script: apply the lease with ip(8).
case "$1" in
deconfig) ip addr flush dev "$interface" ;;
bound | renew)
	ip addr flush dev "$interface"
	ip addr add "$ip/${mask:-24}" dev "$interface"
	[ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
	;;
esac
exit 0
