import pytest

from kh import textobj
from kh.errors import UsageError
from kh.model import AllocationInfo, Domain, DomainKind, NodeInfo

EXAMPLE = """con12@10.255.0.1
protocol: uboot
network External : eth0
network Internal : eth1
network 7 : eth2
nodeinfo: 3 3 10.255.1.3
nodeinfo: 4 4 10.255.1.4
nodes: 3 4
"""


def test_design_example_roundtrips():
    a = textobj.parse(EXAMPLE)
    assert a.id == 12 and a.server == "10.255.0.1" and a.channel == "con12@10.255.0.1"
    assert [d.netid for d in a.domains] == [0, 1, 7]
    assert [n.number for n in a.nodes] == [3, 4]
    assert textobj.format(a) == EXAMPLE


def test_format_and_json():
    a = AllocationInfo(5, "127.0.0.1", (Domain(3, DomainKind.PRIVATE, "al"),),
                       (NodeInfo(1, 1, "10.3.0.1"),))
    assert textobj.format(a) == ("con5@127.0.0.1\nprotocol: uboot\nnetwork 3 : eth0\n"
                                 "nodeinfo: 1 1 10.3.0.1\nnodes: 1\n")
    j = textobj.to_json(a)
    assert j["channel"] == "con5@127.0.0.1" and j["networks"][0]["interface"] == "eth0"


@pytest.mark.parametrize("text,msg", [
    ("", "empty"),
    ("hello\nnodes: 1\n", "not con<ID>@<host>"),
    ("con1@h\nnetwork 3 : eth1\nnetwork 4 : eth0\nnodes: 1\n", "out of order"),
    ("con1@h\nnetwork 3 : eth4\nnodes: 1\n", "4 interfaces"),
    ("con1@h\nbogus line\nnodes: 1\n", "not understood"),
    ("con1@h\nprotocol: uboot\n", "no `nodes:`"),
    ("con1@h\nnodes: a b\n", "bad node list"),
    ("con1@h\nnodeinfo: 1 1 x\nnodes: 2\n", "does not match"),
])
def test_malformed(text, msg):
    with pytest.raises(UsageError, match=msg):
        textobj.parse(text)
