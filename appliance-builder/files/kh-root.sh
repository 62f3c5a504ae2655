# kh root helpers (sourced, busybox ash), installed as /lib/kh/root.sh by the appliances that
# boot a node into a whole root file system (nfsroot, aoeroot): the paper's general-purpose
# servers.

# kh_root_valid_sshkey TYPE:BASE64: true for an OpenSSH public key with ':' for the space (the
# kernel command line splits words at spaces) of a type dropbear takes; nothing else, so the
# value can never carry authorized_keys options or a second line.
kh_root_valid_sshkey() {
	local b64
	case "${1%%:*}" in
	ssh-ed25519 | ssh-rsa | ecdsa-sha2-nistp256 | ecdsa-sha2-nistp384 | ecdsa-sha2-nistp521) ;;
	*) return 1 ;;
	esac
	b64=${1#*:}
	[ ${#b64} -ge 16 ] && [ ${#b64} -le 4000 ] || return 1
	echo "$b64" | grep -Eq '^[A-Za-z0-9+/]+={0,2}$'
}

# kh_root_ssh ROOT TYPE:BASE64: once ROOT boots, that key (and no password) logs in as root
# over ssh. Writes ROOT/root/.ssh/authorized_keys (that key alone) and ROOT/etc/rc.d/50-kh-sshd,
# which the root's rcS starts: dropbear on port 22 with an ed25519 host key made at the first
# boot, its public half printed on the console ("kh: ssh host key ssh-ed25519 AAAA...") so that
# the principal can pin it from the control channel before logging in. Both directories must
# be writable. Status 1 when they are not, and KH_WHY says why.
kh_root_ssh() {
	if ! { mkdir -p "$1/root/.ssh" "$1/etc/rc.d" &&
		echo "${2%%:*} ${2#*:}" >"$1/root/.ssh/authorized_keys"; } 2>/dev/null; then
		KH_WHY="cannot write /root/.ssh and /etc/rc.d in the new root (read-only?)"
		return 1
	fi
	chmod 700 "$1/root/.ssh"
	chmod 600 "$1/root/.ssh/authorized_keys"
	cat >"$1/etc/rc.d/50-kh-sshd" <<'SCRIPT'
#!/bin/sh
# Written by kh's boot appliance for boot key kh.sshkey (the key is in
# /root/.ssh/authorized_keys): dropbear on port 22, public-key logins only.
[ "$1" = start ] || exit 0
key=/etc/dropbear/dropbear_ed25519_host_key
mkdir -p /etc/dropbear
[ -s "$key" ] || dropbearkey -t ed25519 -f "$key" >/dev/null 2>&1
dropbear -s -r "$key" -p 22 -P /run/dropbear.pid || { echo "kh: dropbear did not start"; exit 1; }
echo "kh: ssh host key $(dropbearkey -y -f "$key" | grep '^ssh-' | cut -d ' ' -f 1,2)"
SCRIPT
	chmod 755 "$1/etc/rc.d/50-kh-sshd"
}

# kh_root_switch ROOT INIT: /dev, /proc and /sys move into ROOT, and INIT runs there as PID 1
# (the initramfs is emptied by switch_root). Does not return.
kh_root_switch() {
	local m
	for m in dev proc sys; do
		mount --move "/$m" "$1/$m" 2>/dev/null
	done
	exec switch_root "$1" "$2"
}
