"""Channel user names and allocation ids have one spelling each (HARDEN, item 2): ``con016``
and ``con0`` are nobody, not ``con16``; the CLI reads ``kh release 016`` or other scripts'
digits as malformed, not as allocation 16."""

from __future__ import annotations

import pytest

from kh.cc.sshd import parse_user
from kh.cli.service import alloc_id
from kh.errors import UsageError


@pytest.mark.parametrize("name", ["con016", "con0", "con00", "con16.01", "con16.0",
                                  "con016.1", "con0.1"])
def test_a_number_with_a_leading_zero_is_nobody(name):
    assert parse_user(name) is None


@pytest.mark.parametrize("name,parsed", [("con16", (16, None)), ("con16.3", (16, 3)),
                                         ("con1.10", (1, 10)), ("con999999999", (999999999, None))])
def test_the_one_spelling(name, parsed):
    assert parse_user(name) == parsed


@pytest.mark.parametrize("text", ["016", "con016", "0", "con0@127.0.0.1", "\u0663", "con\u0663",
                                  "+3", " 3"])
def test_the_cli_reads_allocation_ids_as_the_channel_does(text):
    with pytest.raises(UsageError):
        alloc_id(text)


@pytest.mark.parametrize("text,n", [("16", 16), ("con16", 16), ("con16@127.0.0.1", 16)])
def test_the_cli_s_allocation_ids(text, n):
    assert alloc_id(text) == n
