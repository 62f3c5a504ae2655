"""`kh host add`'s input as a careless or hostile operator gives it (TRIAL16, issue 16): what a
URI or a word smuggles into the ssh command khd runs there, and a URI naming another machine
without a way to reach it."""

from __future__ import annotations

import pytest

from kh.errors import UsageError
from kh.service import hostspec
from kh.service.hostspec import HostSpec


@pytest.mark.parametrize("uri", [
    "qemu+ssh://-oproxycommand=date>khpwned/system",      # ssh's option, as the host
    "qemu+ssh://root@-oProxyCommand=id/system",
    "qemu+ssh://-F/system",
    "qemu+ssh://h%2F..%2Fx/system",                        # no hostname has these
    "qemu+ssh://h;id/system",
    "qemu+ssh://h$(id)/system",
    "qemu+ssh://h\u00e9/system",                            # non-ASCII (IDN: punycode it)
    "qemu+ssh://-oProxyCommand=id@h/system",               # ... or as the user
    "qemu+ssh://ro;ot@h/system",
])
def test_the_uris_host_and_user_are_names_never_options_or_shell(uri):
    with pytest.raises(UsageError, match="host URI"):
        hostspec.runner_from_uri(uri)
    with pytest.raises(UsageError, match="host URI"):
        hostspec.check(HostSpec("b", uri), "kh")


@pytest.mark.parametrize("uri, host", [
    ("qemu+ssh://root@hostb.example.org/system", "hostb.example.org"),
    ("qemu+ssh://root@192.0.2.7:2200/system", "192.0.2.7"),
    ("qemu+ssh://root@[2001:db8::7]/system", "2001:db8::7"),
    ("qemu+ssh://kh_op.1@h-2/system", "h-2"),
    ("qemu+ssh://root@kh_b/system", "kh_b"),  # an ssh_config alias
])
def test_well_formed_hosts_and_users_still_make_the_runner(uri, host):
    runner = hostspec.runner_from_uri(uri)
    assert runner[-2:] == (host, "--")
    assert not any(w.startswith("-") for w in runner[-2:-1])


@pytest.mark.parametrize("uri", [
    "qemu://hostb/system",                 # libvirt's TLS transport: another machine
    "qemu+unix://hostb/system",
])
def test_a_uri_of_another_machine_needs_a_runner(uri):
    """Without --runner, khd would run `kh fabric` on its own host for a host elsewhere."""
    with pytest.raises(UsageError, match="--runner"):
        hostspec.check(HostSpec("b", uri), "kh")
    s = hostspec.check(HostSpec("b", uri, runner=("ssh", "hostb", "--")), "kh")
    assert s.runner == ("ssh", "hostb", "--")


@pytest.mark.parametrize("kh", ["kh;touch /tmp/x", "kh $(id)", "-oProxyCommand=x", "k`id`",
                                "/opt/my kh/kh", "kh|sh", "kh\u00e9", "~/kh"])
def test_the_kh_command_is_one_path_the_far_shell_needs_no_quoting_for(kh):
    """ssh joins the words into one line for the far host's shell."""
    with pytest.raises(UsageError, match="--kh"):
        hostspec.check(HostSpec("b", "qemu+ssh://root@hostb/system", kh=kh), "kh")


def test_kh_paths_are_taken():
    for kh in ("kh", "/work/main/.venv/bin/kh", "/opt/kh-2.1/bin/kh"):
        assert hostspec.check(HostSpec("b", "qemu+ssh://root@hostb/system", kh=kh), "kh").kh == kh
