"""Issue 13, item 4: khd refuses a pool the host's memory cannot hold, and says why."""

import pytest

from kh.errors import KhError
from kh.service import config, density, preflight
from kh.service.density import HostMemory


def test_host_memory_reads_meminfo(tmp_path):
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       24683520 kB\nMemFree:        1000 kB\n"
                 "MemAvailable:   20000000 kB\nHugePages_Total:       0\n")
    assert density.host_memory(f) == HostMemory(24105, 19531)
    f.write_text("MemTotal: 1 kB\n")
    with pytest.raises(KhError, match="cannot read the host's memory"):
        density.host_memory(f)


def test_a_pool_that_fits_is_let_through():
    mem = HostMemory(total_mib=24105, available_mib=20000)
    density.check(64, 0, mem)  # 64 x 56 MiB = 3.5 GiB of 19 GiB
    assert density.holds(mem) == (20000 - density.HOST_RESERVE_MIB) // density.NODE_BUDGET_MIB


def test_a_pool_the_memory_cannot_hold_is_refused_naming_memory_and_the_most_that_fits():
    mem = HostMemory(total_mib=24105, available_mib=20000)
    with pytest.raises(KhError) as e:
        density.check(1024, 0, mem)
    assert (f"1024 nodes need about {1024 * density.NODE_BUDGET_MIB} MiB more memory"
            in e.value.message)
    assert "20000 MiB available" in e.value.message
    most = density.holds(mem)
    assert e.value.hint == f"start at most {most}: --nodes {most}"
    density.check(most, 0, mem)
    with pytest.raises(KhError):
        density.check(most + 1, 0, mem)


def test_nodes_that_run_already_hold_their_memory():
    """After `kh service stop` the nodes keep running: starting khd again needs no more."""
    mem = HostMemory(total_mib=4096, available_mib=density.HOST_RESERVE_MIB
                     + 2 * density.NODE_BUDGET_MIB + 10)  # room for 2 more
    density.check(10, 8, mem)
    with pytest.raises(KhError, match="for 3 new ones"):
        density.check(11, 8, mem)


def test_no_room_at_all_says_to_free_memory():
    with pytest.raises(KhError) as e:
        density.check(1, 0, HostMemory(total_mib=2048, available_mib=900))
    assert e.value.hint == "free memory on the host first"


def test_preflight_counts_this_prefixs_running_qemus(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(preflight.procid, "tagged", lambda prefix: [object()] * 3
                        if prefix == "kz" else [])
    monkeypatch.setattr(preflight.density, "host_memory", lambda: HostMemory(8192, 5000))
    monkeypatch.setattr(preflight.density, "check", lambda n, running, mem, budget: seen.append(
        (n, running, mem.available_mib, budget)))
    preflight.check_memory(config.ServiceConfig(state_dir=tmp_path, images=tmp_path,
                                                prefix="kz", nodes=12, qemu="qemu-system-ppc"))
    own = str(tmp_path / config.QEMU_PROGRAM)  # KH_QEMU naming kh's QEMU: its nodes hold less
    preflight.check_memory(config.ServiceConfig(state_dir=tmp_path, images=tmp_path,
                                                prefix="kz", nodes=12, qemu=own))
    preflight.check_memory(config.ServiceConfig(state_dir=tmp_path, images=tmp_path,
                                                prefix="kz", nodes=12, backend="libvirt",
                                                qemu=own))
    assert seen == [(12, 3, 5000, density.DEBIAN_NODE_BUDGET_MIB),
                    (12, 3, 5000, density.NODE_BUDGET_MIB),
                    (12, 3, 5000, density.DEBIAN_NODE_BUDGET_MIB)]


def test_kh_hw_states_the_density():
    d = density.describe(HostMemory(total_mib=24105, available_mib=20000), cores=2)
    assert d["idle booted node"].startswith(f"{density.IDLE_CPU_PCT:g} % of a host core, "
                                            f"{density.IDLE_BOOTED_MIB} MiB with kh's QEMU")
    assert f"about {density.holds(HostMemory(24105, 20000))} more booted idle nodes" \
        in d["this host"]
    debian = density.describe(HostMemory(24105, 20000), cores=2, khs_qemu=False)
    assert f"{density.DEBIAN_IDLE_BOOTED_MIB} MiB with Debian's QEMU" in debian["idle booted node"]
    assert (f"about {density.holds(HostMemory(24105, 20000), density.DEBIAN_NODE_BUDGET_MIB)} "
            "more booted idle nodes") in debian["this host"]
