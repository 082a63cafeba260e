"""The filter engine as a table of cases, plus a property test: it never raises anything
but ProtocolError(INVALID_MESSAGE), whatever JSON it is given."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from signaling_trio.protocol.errors import INVALID_MESSAGE, ProtocolError
from signaling_trio.protocol.filters import Filter


class P:
    def __init__(self, role="worker", tags=(), properties=None, reserved_by=None):
        self.role = role
        self.tags = frozenset(tags)
        self.properties = properties or {}
        self.reserved_by = reserved_by


W = P(
    "worker",
    ["gpu", "training"],
    {"mem": 16384, "status": "available", "model": "A100", "ok": True, "n": None, "ver": "1.4"},
)

CASES = [
    ({}, True),
    ({"role": "worker"}, True),
    ({"role": "client"}, False),
    ({"tags": ["gpu"]}, True),
    ({"tags": ["cpu", "training"]}, True),
    ({"tags": ["cpu"]}, False),
    ({"tags": []}, False),
    ({"tags_all": ["gpu", "training"]}, True),
    ({"tags_all": ["gpu", "cpu"]}, False),
    ({"tags_all": []}, True),
    ({"properties": {"status": "available"}}, True),
    ({"properties": {"status": "busy"}}, False),
    ({"properties": {"mem": {"$eq": 16384}}}, True),
    ({"properties": {"mem": {"$eq": 16384.0}}}, True),
    ({"properties": {"mem": {"$ne": 1}}}, True),
    ({"properties": {"mem": {"$gt": 16384}}}, False),
    ({"properties": {"mem": {"$gte": 16384}}}, True),
    ({"properties": {"mem": {"$lt": 20000}}}, True),
    ({"properties": {"mem": {"$lte": 100}}}, False),
    ({"properties": {"mem": {"$gte": 8000, "$lte": 20000}}}, True),
    ({"properties": {"mem": {"$gte": 8000, "$lte": 9000}}}, False),
    ({"properties": {"model": {"$in": ["A100", "H100"]}}}, True),
    ({"properties": {"model": {"$nin": ["A100", "H100"]}}}, False),
    ({"properties": {"model": {"$in": []}}}, False),
    ({"properties": {"model": {"$nin": []}}}, True),
    ({"properties": {"ver": {"$gte": "1.3"}}}, True),  # strings compare as strings
    # unlike types never match, never raise
    ({"properties": {"mem": {"$gt": "100"}}}, False),
    ({"properties": {"status": {"$lt": 5}}}, False),
    ({"properties": {"mem": "16384"}}, False),
    ({"properties": {"ok": 1}}, False),  # true is not 1
    ({"properties": {"ok": True}}, True),
    ({"properties": {"mem": {"$in": ["16384", True]}}}, False),
    ({"properties": {"n": None}}, True),  # explicit null property equals null
    # missing property: fails everything but $ne, $nin, $exists:false
    ({"properties": {"missing": "x"}}, False),
    ({"properties": {"missing": {"$eq": None}}}, False),
    ({"properties": {"missing": {"$gt": 1}}}, False),
    ({"properties": {"missing": {"$in": [1]}}}, False),
    ({"properties": {"missing": {"$ne": 1}}}, True),
    ({"properties": {"missing": {"$nin": [1]}}}, True),
    ({"properties": {"missing": {"$exists": False}}}, True),
    ({"properties": {"missing": {"$exists": True}}}, False),
    ({"properties": {"mem": {"$exists": True}}}, True),
    ({"properties": {"mem": {"$exists": False}}}, False),
    ({"unreserved": True}, True),
    ({"unreserved": False}, True),
    ({"role": "worker", "tags": ["gpu"], "properties": {"mem": {"$gte": 8192}, "status": "available"}}, True),
    ({"whatever_key": 1}, True),  # unknown top-level keys are ignored (v2 did)
]


@pytest.mark.parametrize("filters, expected", CASES)
def test_filter_table(filters, expected):
    assert Filter(filters).matches(W) is expected


def test_unreserved_and_viewer():
    reserved = P(reserved_by="alice")
    f = Filter({"unreserved": True})
    assert not f.matches(reserved)
    assert not f.matches(reserved, viewer="bob")
    assert f.matches(reserved, viewer="alice")  # the holder's own reservation does not count


@pytest.mark.parametrize(
    "filters",
    [
        [], "x", 3,
        {"role": 5},
        {"tags": "gpu"}, {"tags": [{"a": 1}]}, {"tags_all": [[1]]},
        {"properties": []},
        {"properties": {"x": {"$regex": "a"}}},
        {"properties": {"x": {"$gt": [1]}}},
        {"properties": {"x": {"$gt": None}}},
        {"properties": {"x": {"$in": 3}}},
        {"properties": {"x": {"$nin": "abc"}}},
        {"properties": {"x": {"$exists": 1}}},
        {"properties": {"x": {"$eq": 1, "plain": 2}}},
        {"unreserved": "yes"},
    ],
)
def test_malformed_filters_are_invalid_message(filters):
    with pytest.raises(ProtocolError) as info:
        Filter(filters)
    assert info.value.code == INVALID_MESSAGE


def test_plain_object_value_is_equality():
    p = P(properties={"gpu": {"model": "A100", "mem": 80}})
    assert Filter({"properties": {"gpu": {"model": "A100", "mem": 80}}}).matches(p)
    assert not Filter({"properties": {"gpu": {"model": "A100"}}}).matches(p)


# operators and filter keys, so generated filters hit the parser's real branches
FILTER_WORDS = ["$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists",
                "role", "tags", "tags_all", "properties", "unreserved"]
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=5)
    | st.sampled_from(FILTER_WORDS + ["$bad"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(FILTER_WORDS + ["$zz", "mem", "status", "x"]) | st.text(max_size=4),
            children,
            max_size=4,
        )
    ),
    max_leaves=20,
)
peers = st.builds(
    P,
    role=st.sampled_from(["worker", "client", "peer"]),
    tags=st.lists(st.text(max_size=3) | st.integers(), max_size=3),
    properties=st.dictionaries(st.sampled_from(["mem", "status", "x"]), json_values, max_size=3),
    reserved_by=st.none() | st.just("h"),
)


@settings(max_examples=400, deadline=None)
@given(filters=json_values, peer=peers)
def test_filter_never_raises_anything_else(filters, peer):
    try:
        f = Filter(filters)
    except ProtocolError as exc:
        assert exc.code == INVALID_MESSAGE
        return
    assert f.matches(peer) in (True, False)
    assert f.matches(peer, viewer="h") in (True, False)
