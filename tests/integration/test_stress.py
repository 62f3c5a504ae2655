"""Issue 10's stress test: hostile clients on 127.0.0.1 while another principal works.

200 idle HTTP clients of khd's API (half send nothing, half the first lines of a request) and 50
half-open ssh logins (half send nothing, half only a version banner), from 127.0.0.2 (loopback,
where any local user's program is) by another local user (nobody), and one session of
principal A that asks its node for megabytes of output and never reads, while principal B runs
the paper's Listing 1 on 4 nodes with the apache appliance (each page fetched from the outside
world). Listing 1 must complete, khd's thread count and RSS must stay under the bounds below,
and principal A's own requests over loopback TCP, as this test's user, are still answered
(the attacker's connections count against its user's limits, not every local user's). The load is
benchmarks/hostile_load.py's, which benchmarks/hostile.py measures.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from benchmarks.hostile_load import (
    ATTACKER_UID,
    QUIET_LINE,
    Failed,
    HostileLoad,
    Listing1,
    Sampler,
    alloc_of,
    khget,
    post,
    quiet_session,
    release,
    settled,
    wait_free,
)
from kh.service import control
from kh.service.config import ServiceConfig
from kh.settings import Paths
from tests.integration.conftest import free_port

pytestmark = [pytest.mark.guest, pytest.mark.scenario]

NODES = 5  # Listing 1's 4 and the quiet session's 1
HTTP_CLIENTS, SSH_LOGINS, LISTING_NODES = 200, 50, 4
# The bounds are over khd's own numbers just before the load, so they hold for any pool size.
# Threads: the 250 idle connections must not cost a thread each (issue 10: "a bounded pool or
# an event loop, not a thread per idle client"). Listing 1 and the quiet session alone took khd
# 8 threads over idle at 8943202; 64 leaves room for a bounded pool of workers in each server,
# and for paramiko's thread per ssh connection while unauthenticated ones are capped per source.
# A thread per connection (8943202: 335 over idle) is far past it.
THREADS_OVER_IDLE = 64
# RSS: Listing 1 alone (no hostile clients) took khd from 55 to a peak of 151 MiB at 8943202
# (two images through khd, and freed scrypt buffers kept by the allocator's per-thread arenas);
# 160 MiB is that growth plus 64 MiB for the 250 idle connections (256 KiB each) and the quiet
# session's bounded backlog. A buffer per connection or per unread session that grows with
# what the clients send or the node prints is what this bound is for.
RSS_OVER_IDLE_MIB = 160
A, A_CRED, B, B_CRED = "stressa", "stressa-cred", "stressb", "stressb-cred"


@pytest.fixture(scope="module")
def stress_khd(tmp_path_factory: pytest.TempPathFactory, kh_paths: Paths,
               outside: str) -> Iterator[ServiceConfig]:
    """A khd of this test's own, so its idle numbers are its own (not left by other tests)."""
    if os.geteuid() != 0:
        pytest.fail("the stress test needs root (network namespaces, bridges, taps)")
    cfg = ServiceConfig(state_dir=tmp_path_factory.mktemp("khd") / "state", images=kh_paths.out,
                        nodes=NODES, api_port=free_port(), ssh_port=free_port(),
                        prefix=f"khg{os.getpid() % 10000}", uplink_netns=outside)
    try:
        control.start(cfg)
        yield cfg
    finally:
        control.clean(cfg)


def test_listing_1_completes_and_khd_stays_bounded_under_hostile_clients(stress_khd):
    cfg = stress_khd
    pid = control.pid_of(cfg)
    assert pid is not None
    wait_free(cfg, NODES)
    idle = settled(pid)
    load = HostileLoad(cfg, HTTP_CLIENTS, SSH_LOGINS, uid=ATTACKER_UID)
    b = Listing1(cfg, B, B_CRED, LISTING_NODES)
    a_alloc = quiet = None
    cut: dict[str, int] = {}
    answers: list[tuple[int, dict[str, object]]] = []
    listing_error = None
    try:
        a_alloc = alloc_of(khget(cfg, A, A_CRED, 1))
        with Sampler(pid) as sampler:
            load.open()
            quiet = quiet_session(cfg, a_alloc, A_CRED, QUIET_LINE)
            # A, over loopback TCP like the attackers, from their address even: answered
            answers = [post(cfg.api_port, "/v1/keys/list", {"user": A, "credential": A_CRED},
                            source) for source in ("127.0.0.1", "127.0.0.2")]
            try:
                b.run(timeout=180)
            except Failed as e:
                listing_error = str(e)
        described = load.describe()
        cut = load.closed_by_khd()  # (before close) the connections khd refused or timed out
    finally:
        if quiet is not None:
            quiet.close()
        load.close()
        for user, cred, alloc in ((A, A_CRED, a_alloc), (B, B_CRED, b.alloc)):
            if alloc is not None:
                release(cfg, user, cred, alloc)
    peak = sampler.peak
    problems = []
    if listing_error:
        problems.append(f"Listing 1 did not complete: {listing_error}")
    if [status for status, _ in answers] != [200, 200]:
        problems.append(f"principal A's own requests over loopback were not answered: {answers}")
    if load.refused["http"] == 0 and cut["http"] == 0:
        problems.append("the attacker's 200 HTTP connections were all kept: no per-source limit")
    if peak.threads > idle.threads + THREADS_OVER_IDLE:
        problems.append(f"khd's threads reached {peak.threads}, over the bound of "
                        f"{idle.threads + THREADS_OVER_IDLE} (idle {idle.threads} + "
                        f"THREADS_OVER_IDLE {THREADS_OVER_IDLE})")
    if peak.rss_kib > idle.rss_kib + RSS_OVER_IDLE_MIB * 1024:
        problems.append(f"khd's RSS reached {peak.rss_mib:.0f} MiB, over the bound of "
                        f"{idle.rss_mib + RSS_OVER_IDLE_MIB:.0f} MiB (idle {idle.rss_mib:.0f} + "
                        f"RSS_OVER_IDLE_MIB {RSS_OVER_IDLE_MIB})")
    assert not problems, f"under {described} and A's unread session: " + "; ".join(problems)
