import pytest

from kh.allocation import (
    AllocationError,
    Request,
    boot_keys,
    choose_nodes,
    host_address,
    node_address,
    plan_domains,
)
from kh.errors import UsageError
from kh.model import Domain, DomainKind


def nets(plan):
    return [d.netid for d in plan.order]


def test_first_allocation_creates_private_domain():
    plan = plan_domains(Request("alice"), {}, 3)
    assert nets(plan) == [3] and [d.netid for d in plan.create] == [3]
    assert plan.create[0].owner == "alice"


def test_later_allocation_reuses_it():
    plan = plan_domains(Request("alice"), {3: "alice", 4: "bob"}, 5)
    assert nets(plan) == [3] and plan.create == ()


def test_paper_example_order():
    # khget -i -n 128,45 -p 1: public, 128, 45, then the new one
    owned = {128: "j", 45: "j", 3: "j"}
    plan = plan_domains(Request("j", existing=(128, 45), new_private=1, public=True), owned, 4)
    assert nets(plan) == [1, 128, 45, 4]
    assert plan.order[0].label == "Internal" and plan.order[1].label == "128"


def test_external_first_then_public_then_private():
    plan = plan_domains(Request("a", external=True, public=True), {3: "a"}, 4)
    assert nets(plan) == [0, 1, 3]
    assert [d.label for d in plan.order] == ["External", "Internal", "3"]


def test_new_ids_skip_taken():
    plan = plan_domains(Request("a", new_private=2), {3: "b", 4: "b", 6: "c"}, 3)
    assert [d.netid for d in plan.create] == [5, 7]


@pytest.mark.parametrize("req,owned,msg", [
    (Request("a", existing=(9,)), {}, "principal a has no private domain 9"),
    (Request("a", existing=(3,)), {3: "b"}, "principal a has no private domain 3"),
])
def test_foreign_or_missing_domains_refused(req, owned, msg):
    with pytest.raises(AllocationError, match=msg):
        plan_domains(req, owned, 4)


@pytest.mark.parametrize("req", [
    Request("a", count=0), Request("a", count=-2), Request("a", new_private=-1),
    Request("a", existing=(1,)), Request("a", existing=(0,)), Request("a", existing=(2,)),
    Request("a", existing=(5, 5)), Request("a", new_private=5),
])
def test_bad_requests(req):
    with pytest.raises(UsageError):
        plan_domains(req, {5: "a"}, 6)


def test_addresses_and_boot_keys():
    assert str(node_address(3, 7)) == "10.3.0.7/16"
    assert str(node_address(200, 300)) == "10.200.1.44/16"
    assert str(host_address(1)) == "10.1.255.254/16"
    doms = (Domain(0, DomainKind.EXTERNAL, None), Domain(5, DomainKind.PRIVATE, "a"))
    keys = boot_keys(doms, 4, "10.1.255.254:8080")
    assert keys == ("kh.node=4 kh.hostname=node4 kh.eth0=10.0.0.4/16 kh.gw=10.0.255.254 "
                    "kh.eth1=10.5.0.4/16 kh.server=10.1.255.254:8080")
    assert boot_keys(doms[1:], 4, "h:1", "h:2").endswith("kh.server=h:1 kh.channel=h:2")


def test_choose_nodes():
    assert choose_nodes([5, 2, 9], 2) == [2, 5]
    with pytest.raises(AllocationError, match="3 nodes asked for, 2 free"):
        choose_nodes([1, 2], 3)


def test_new_domains_take_the_lowest_free_ids():
    # a principal once held 253, the highest id: others still get ids (3 was freed)
    plan = plan_domains(Request("a", new_private=2), {4: "b", 253: "c"})
    assert [d.netid for d in plan.create] == [3, 5]


def test_the_private_domain_quota_names_itself():
    owned = {3: "a", 4: "a", 5: "b"}
    assert len(plan_domains(Request("a", new_private=1), owned, quota=3).create) == 1
    with pytest.raises(AllocationError, match="private-domain quota of 2"):
        plan_domains(Request("a", new_private=1), owned, quota=2)
    with pytest.raises(AllocationError, match="quota of 0"):  # the implicit first domain
        plan_domains(Request("c"), owned, quota=0)
    assert plan_domains(Request("a"), owned, quota=2).create == ()  # joining one is free


@pytest.mark.parametrize("owned,want", [
    ({3: "a"}, "holds 1 private domain and asks for 1 more"),
    ({3: "a", 4: "a"}, "holds 2 private domains and asks for 1 more"),
    ({}, "holds 0 private domains and asks for 1 more"),
])
def test_the_domain_quota_refusal_counts_in_good_grammar(owned, want):
    """Issue 10: it said "holds 1 private domains"."""
    with pytest.raises(AllocationError) as e:
        plan_domains(Request("a", new_private=1), owned, quota=len(owned))
    assert want in e.value.message
