# kh boot keys: shared by every appliance's /init (sourced, busybox ash).
# The keys come from the kernel command line, which U-Boot builds from its environment
# (${khargs}); docs/boot-keys.md lists them all.

kh_say() { echo "kh: $*"; }

kh_mount_basics() {
	mount -t proc proc /proc
	mount -t sysfs sysfs /sys
	mount -t devtmpfs devtmpfs /dev 2>/dev/null
	mkdir -p /dev/pts /dev/shm
	mount -t devpts devpts /dev/pts
	mount -t tmpfs tmpfs /tmp
	mount -t tmpfs tmpfs /run
	# Keep kernel chatter off the console that principals script.
	dmesg -n 1
}

# kh_valid_cidr A.B.C.D/P: true when it is a well-formed IPv4 address with prefix.
kh_valid_cidr() {
	local addr prefix
	case "$1" in
	*/*) ;;
	*) return 1 ;;
	esac
	addr=${1%/*}
	prefix=${1#*/}
	kh_valid_ip "$addr" || return 1
	case "$prefix" in
	'' | *[!0-9]*) return 1 ;;
	esac
	[ "$prefix" -le 32 ]
}

kh_valid_ip() {
	local octet
	echo "$1" | grep -Eq '^[0-9]{1,3}(\.[0-9]{1,3}){3}$' || return 1
	for octet in $(echo "$1" | tr . ' '); do
		[ "$octet" -le 255 ] || return 1
	done
	return 0
}

kh_valid_name() {
	echo "$1" | grep -Eq '^[A-Za-z0-9][A-Za-z0-9.-]{0,62}$'
}

kh_valid_hostport() {
	kh_valid_ip "${1%:*}" || return 1
	case "${1##*:}" in '' | *[!0-9]*) return 1 ;; esac
	[ "${1##*:}" -ge 1 ] && [ "${1##*:}" -le 65535 ]
}

# Where the channel's pinned host key is kept: dbclient reads $HOME/.ssh/known_hosts, so
# khgetdisk runs it with HOME set here.
KH_CHANNEL_HOME=${KH_CHANNEL_HOME:-/etc/kh/channel}

# kh_pin_channel HOST:PORT#TYPE:BASE64: writes the one known_hosts line dbclient checks the
# channel's host key against ("HOST TYPE BASE64": dropbear matches the host without the port
# and compares the whole key); fails, writing nothing, for anything malformed.
kh_pin_channel() {
	local pin b64
	case "$1" in *#*:*) ;; *) return 1 ;; esac
	kh_valid_hostport "${1%%#*}" || return 1
	pin=${1#*#}
	case "${pin%%:*}" in
	ssh-rsa | ssh-ed25519 | ecdsa-sha2-nistp256 | ecdsa-sha2-nistp384 | ecdsa-sha2-nistp521) ;;
	*) return 1 ;;
	esac
	b64=${pin#*:}
	[ ${#b64} -ge 16 ] && [ ${#b64} -le 4000 ] || return 1
	echo "$b64" | grep -Eq '^[A-Za-z0-9+/]+={0,2}$' || return 1
	mkdir -p "$KH_CHANNEL_HOME/.ssh" || return 1
	chmod 700 "$KH_CHANNEL_HOME/.ssh"
	echo "${1%%:*} ${pin%%:*} ${pin#*:}" >"$KH_CHANNEL_HOME/.ssh/known_hosts" || return 1
}

# kh_fetch_image SERVER NAME DEST: the published image NAME, fetched from the service at
# SERVER (HOST:PORT) into DEST, only if its bytes have the sha256 the service lists for it
# (GET /v1/images: "NAME SIZE SHA256" lines); otherwise DEST is left alone and one line says
# why (on stdout; status 1).
kh_fetch_image() {
	local want got
	want=$(wget -q -T 60 -O - "http://$1/v1/images" | awk -v n="$2" '$1 == n {print $3}')
	if ! echo "$want" | grep -Eq '^[0-9a-f]{64}$'; then
		echo "the service at $1 lists no sha256 for image $2; not fetched"
		return 1
	fi
	rm -f "$3.part"
	if ! wget -q -T 120 -O "$3.part" "http://$1/v1/images/$2"; then
		rm -f "$3.part"
		echo "cannot fetch image $2 from the service at $1"
		return 1
	fi
	got=$(sha256sum "$3.part" | cut -d ' ' -f 1)
	if [ "$got" != "$want" ]; then
		rm -f "$3.part"
		echo "image $2 from $1 has sha256 $got, not the published $want; refused"
		return 1
	fi
	mv "$3.part" "$3"
}

# kh_read_keys: sets KH_<KEY> variables from kh.* words of /proc/cmdline, refusing
# malformed values by name (the appliance still comes up, with that key ignored).
kh_read_keys() {
	local word key value
	KH_IFACES=""
	for word in $(cat "${KH_CMDLINE:-/proc/cmdline}"); do
		case "$word" in
		kh.*=*) ;;
		*) continue ;;
		esac
		key=${word%%=*}
		key=${key#kh.}
		value=${word#*=}
		case "$key" in
		eth[0-9] | eth[0-9][0-9])
			if [ "$value" = dhcp ] || [ "$value" = none ] || kh_valid_cidr "$value"; then
				eval "KH_IF_$key=\$value"
				KH_IFACES="$KH_IFACES $key"
			else
				kh_say "boot key kh.$key=$value is malformed (want A.B.C.D/P, dhcp or none); ignored"
			fi
			;;
		mtu[0-9] | mtu[0-9][0-9])
			# ethN's MTU: less than 1500 in a domain that spans hosts (VXLAN's 50 bytes)
			case "$value" in
			[1-9][0-9] | [1-9][0-9][0-9] | [1-9][0-9][0-9][0-9] | [1-6][0-9][0-9][0-9][0-9])
				if [ "$value" -ge 68 ] && [ "$value" -le 65535 ]; then
					eval "KH_MTU_eth${key#mtu}=\$value"
				else
					kh_say "boot key kh.$key=$value is out of range (68-65535); ignored"
				fi
				;;
			*) kh_say "boot key kh.$key=$value is malformed (want a number of bytes); ignored" ;;
			esac
			;;
		gw)
			if kh_valid_ip "$value"; then KH_GW=$value; else
				kh_say "boot key kh.gw=$value is malformed (want A.B.C.D); ignored"
			fi
			;;
		hostname)
			if kh_valid_name "$value"; then KH_HOSTNAME=$value; else
				kh_say "boot key kh.hostname=$value is malformed; ignored"
			fi
			;;
		node)
			case "$value" in
			'' | *[!0-9]*) kh_say "boot key kh.node=$value is malformed (want a number); ignored" ;;
			*) KH_NODE=$value ;;
			esac
			;;
		server)
			case "$value" in
			*:*) KH_SERVER=$value ;;
			*) kh_say "boot key kh.server=$value is malformed (want HOST:PORT); ignored" ;;
			esac
			;;
		channel)
			# HOST:PORT#TYPE:BASE64: the control channel and its ssh host key, pinned for
			# dbclient (khgetdisk); kh_key channel gives HOST:PORT alone
			if kh_pin_channel "$value"; then KH_EXTRA_channel=${value%%#*}; else
				kh_say "boot key kh.channel=${value%%#*}... is malformed (want HOST:PORT#ssh-rsa:BASE64); ignored"
			fi
			;;
		*)
			eval "KH_EXTRA_$(echo "$key" | tr -c 'A-Za-z0-9\n' _)=\$value" 2>/dev/null ||
				kh_say "boot key kh.$key is malformed; ignored"
			;;
		esac
	done
}

# kh_configure_net: lo up; every ethN the kernel found comes up, with its kh.ethN address.
kh_configure_net() {
	local path dev mtu conf
	ip link set lo up
	for path in "${KH_SYS_NET:-/sys/class/net}"/eth*; do
		[ -e "$path" ] || continue
		dev=${path##*/}
		eval "mtu=\${KH_MTU_$dev:-}"
		if [ -z "$mtu" ]; then
			ip link set "$dev" up
		elif ! ip link set "$dev" mtu "$mtu" up; then
			kh_say "$dev: cannot set MTU $mtu"
			ip link set "$dev" up
		fi
		eval "conf=\${KH_IF_$dev:-}"
		case "$conf" in
		'' | none) ;;
		dhcp) udhcpc -q -n -t 5 -i "$dev" -s /lib/kh/udhcpc.sh >/dev/null 2>&1 ||
			kh_say "$dev: no DHCP answer" ;;
		*) ip addr add "$conf" dev "$dev" || kh_say "$dev: cannot set $conf" ;;
		esac
	done
	for dev in $KH_IFACES; do
		[ -e "/sys/class/net/$dev" ] || kh_say "boot key kh.$dev names an interface this node lacks"
	done
	if [ -n "${KH_GW:-}" ]; then
		ip route add default via "$KH_GW" || kh_say "cannot route via $KH_GW"
	fi
	hostname "${KH_HOSTNAME:-node${KH_NODE:-0}}"
}

# kh_addrs: "eth0=10.0.0.3/24 eth1=..." for the ready line: each ethN's first IPv4 address.
# One `ip` for all of them, read by the shell: every process costs a node ~30 ms of emulated
# CPU, and three per interface (ip, awk, head) made this 0.4 s of an apache node's boot.
kh_addrs() {
	local all out path dev a name cidr
	all=$(ip -4 -o addr show 2>/dev/null)
	out=""
	for path in "${KH_SYS_NET:-/sys/class/net}"/eth*; do
		[ -e "$path" ] || continue
		dev=${path##*/}
		a=none
		while read -r _ name _ cidr _; do  # "2: eth0    inet 10.0.0.3/24 brd ..."
			if [ "$name" = "$dev" ]; then
				a=$cidr
				break
			fi
		done <<KHADDRS
$all
KHADDRS
		out="$out $dev=$a"
	done
	echo "${out# }"
}

# kh_shell_forever: a shell on the console with job control; a new one if it exits
# (PID 1 must never exit).
kh_shell_forever() {
	while true; do
		setsid cttyhack /bin/sh -l
		sleep 1
	done
}

# --- for appliances with keys of their own ---------------------------------------------

# kh_key NAME: the value of appliance key kh.NAME ("" when the node was not given it).
kh_key() {
	eval "printf '%s' \"\${KH_EXTRA_$1:-}\""
}

# kh_ready [WORDS]: the one line that says the appliance does its job.
kh_ready() {
	echo "kh-ready: ${KH_APPLIANCE:-shell} $(hostname) $(kh_addrs)${1:+ $1}"
}

# kh_fail MSG: the appliance cannot do its job; say why on the console (by key name when a
# key is at fault) and give the principal a shell instead of hanging.
kh_fail() {
	kh_say "$*"
	echo "kh-failed: ${KH_APPLIANCE:-shell} $(hostname): $*"
	kh_shell_forever
}

# kh_configured: the ethN that got an address, in order.
kh_configured() {
	local out path dev conf
	out=""
	for path in /sys/class/net/eth*; do
		[ -e "$path" ] || continue
		dev=${path##*/}
		eval "conf=\${KH_IF_$dev:-}"
		case "$conf" in '' | none) ;; *) out="$out $dev" ;; esac
	done
	echo "${out# }"
}

# kh_valid_iface ethN: an interface this node has.
kh_valid_iface() {
	case "$1" in eth[0-9] | eth[0-9][0-9]) ;; *) return 1 ;; esac
	[ -e "/sys/class/net/$1" ]
}

# kh_valid_count N [MAX]: a whole number (at most MAX).
kh_valid_count() {
	case "$1" in '' | *[!0-9]*) return 1 ;; esac
	[ -z "${2:-}" ] || [ "$1" -le "$2" ]
}

# kh_mib SIZE: SIZE (like 64M, 1G or 65536K) in MiB; fails on anything else.
kh_mib() {
	local n
	case "$1" in
	*[!0-9KMGkmg]* | '' | [KMGkmg]*) return 1 ;;
	*[Kk]) n=${1%?}; kh_valid_count "$n" && echo $((n / 1024)) ;;
	*[Mm]) n=${1%?}; kh_valid_count "$n" && echo "$n" ;;
	*[Gg]) n=${1%?}; kh_valid_count "$n" && echo $((n * 1024)) ;;
	*) kh_valid_count "$1" && echo $(($1 / 1048576)) ;;
	esac
}

# kh_private_iface: the first ethN (in eth order) whose address is in a private domain, i.e.
# neither 10.0/16 (external) nor 10.1/16 (public); fails when there is none. ($KH_SYSNET: tests)
kh_private_iface() {
	local path i
	for path in "${KH_SYSNET:-/sys/class/net}"/eth*; do
		[ -e "$path" ] || continue
		i=${path##*/}
		case "$(kh_net_of "$i" 2>/dev/null)" in
		"" | 10.0.0.0/16 | 10.1.0.0/16) ;;
		*) echo "$i"; return 0 ;;
		esac
	done
	return 1
}

# kh_net_of ethN: "10.3.0.0/16" for an interface with 10.3.0.7/16 (the subnet it serves).
kh_net_of() {
	local a
	a=$(ip -4 -o addr show dev "$1" | awk '{print $4}' | head -n 1)
	[ -n "$a" ] || return 1
	ipcalc -n -p "$a" | sed -n 's/^NETWORK=//p; s/^PREFIX=//p' | paste -sd/ -
}
