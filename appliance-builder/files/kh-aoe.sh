# kh AoE helpers (sourced, busybox ash), installed as /lib/kh/aoe.sh by the appliances that
# serve or boot from AoE disks (vblade, rootdisk, aoeroot).

# kh_aoe_addr VALUE: "SHELF SLOT" for a well-formed AoE address (1.0 or e1.0: shelf 0-65534,
# slot 0-254; 65535 and 255 are AoE's broadcast addresses), else status 1.
kh_aoe_addr() {
	local a
	a=${1#e}
	case "$a" in *.*) ;; *) return 1 ;; esac
	kh_valid_count "${a%%.*}" 65534 && kh_valid_count "${a#*.}" 254 || return 1
	echo "${a%%.*} ${a#*.}"
}

# kh_aoe_macs eSHELF.SLOT [IFACE]: each MAC (aa:bb:cc:dd:ee:ff) that answers that AoE address,
# on IFACE only when one is given, one per line (none: nothing answers). aoe-sancheck asks the
# network itself (a config query to every address; answers until 5 s of quiet) and prints
# each answer's MAC; aoeping would not do: it drops answers shorter than 60 bytes, and
# vblade's are 32 (no NIC pads them on a bridge of taps). The aoe driver would not do either:
# two disks on one address look to it like two paths to one disk.
kh_aoe_macs() {
	aoe-sancheck -v 2>/dev/null | awk -v want="${2:-}" -v a="$1" '
		/^eth[0-9]+:$/ { dev = substr($0, 1, length($0) - 1); next }
		$1 == a && length($2) == 12 && (want == "" || dev == want) && !seen[$2]++ { print $2 }' |
		sed 's/../&:/g; s/:$//'
}

# kh_aoe_unanswered SHELF SLOT IFACE: true when no disk answers AoE address eSHELF.SLOT on
# IFACE; otherwise status 1, and KH_WHY says which MAC does. AoE has no arbiter: a second disk
# on an address that already answers in a domain looks to initiators like a second path to
# the first, and their writes get spread over both. So a disk node asks before it serves
# (khgetdisk's addresses come unique from the service; this catches the rest).
kh_aoe_unanswered() {
	local mac
	mac=$(kh_aoe_macs "e$1.$2" "$3" | head -n 1)
	[ -z "$mac" ] && return 0
	KH_WHY="AoE address e$1.$2 already answered by MAC $mac"
	return 1
}

# kh_aoe_serve SHELF SLOT IFACE FILE: serves FILE as AoE disk eSHELF.SLOT on IFACE with vblade
# (in the background, its log in /var/log/vblade.log); returns when vblade announces the disk.
# Otherwise status 1, and KH_WHY says why in a line.
kh_aoe_serve() {
	local pid tries
	setsid vblade "$1" "$2" "$3" "$4" >/var/log/vblade.log 2>&1 &
	pid=$!
	# vblade announces itself ("pid N: e1.0, 131072 sectors O_RDWR") once it serves the disk.
	tries=0
	until grep -q sectors /var/log/vblade.log; do
		if ! kill -0 $pid 2>/dev/null; then
			KH_WHY="vblade did not start: $(tail -n 2 /var/log/vblade.log)"
			return 1
		fi
		tries=$((tries + 1))
		if [ $tries -ge 100 ]; then
			KH_WHY="vblade did not announce the disk within 10 s"
			return 1
		fi
		sleep 0.1
	done
}

# One writer per disk. AoE has no arbiter: two nodes that mount one disk read-write each write
# it behind the other's back, and the file system breaks with no word of why (the paper boots
# one server per root disk). ext4's multi-mount protection (MMP) makes the second mount fail
# instead: the node that has the file system mounted writes a new sequence number to its MMP
# block every 5 s; a mount first watches that block for 11 s and refuses if it moved. A node
# that died mounted leaves it still: its disk can be mounted again after those 11 s.

# kh_aoe_one_writer IMAGE: turns MMP on in the unmounted ext3 file system IMAGE (the layout
# stays ext3's; only the ext4 driver mounts it then). Otherwise status 1, KH_WHY says why.
kh_aoe_one_writer() {
	/usr/sbin/tune2fs -O mmp -E mmp_update_interval=5 "$1" >/tmp/tune2fs.log 2>&1 && return 0
	KH_WHY="tune2fs could not turn on multi-mount protection: $(tail -n 1 /tmp/tune2fs.log)"
	return 1
}

# kh_aoe_mount DISK DIR: mounts AoE disk DISK (eSHELF.SLOT) read-write on DIR with the ext4
# driver (an ext3 file system with MMP or without). A disk another node has mounted is
# refused, and KH_WHY names the node the disk's MMP block names; any other failure too gives
# status 1 and KH_WHY.
kh_aoe_mount() {
	local seen who
	seen=$(dmesg 2>/dev/null | grep -c 'already active on another node')
	mount -t ext4 -o rw "/dev/etherd/$1" "$2" 2>/tmp/mount.err && return 0
	if [ "$(dmesg 2>/dev/null | grep -c 'already active on another node')" -gt "$seen" ]; then
		who=$(dmesg | sed -n 's/.*last update node: \([^,]*\),.*/\1/p' | tail -n 1)
		KH_WHY="AoE disk $1 is mounted by another node${who:+ ($who)}: one writer per disk (ext4 multi-mount protection); not booted"
	else
		KH_WHY="cannot mount $1: $(tail -n 1 /tmp/mount.err)"
	fi
	return 1
}
