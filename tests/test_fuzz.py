"""Fuzzing the frame parser and the room logic with hypothesis: any input yields a valid
answer or one documented protocol error, never another exception."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from signaling_trio.protocol import errors as E
from signaling_trio.protocol.messages import KNOWN_TYPES, decode
from signaling_trio.protocol.room import RoomState

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=25
)
field_names = st.sampled_from(
    [
        "type",
        "peer_id",
        "from_peer_id",
        "to_peer_id",
        "target",
        "sender",
        "payload",
        "metadata",
        "filters",
        "duration_sec",
        "role",
        "tags",
        "properties",
        "room_id",
        "token",
        "id_token",
    ]
)
messages = st.fixed_dictionaries(
    {"type": st.sampled_from(sorted(KNOWN_TYPES) + ["bogus", ""]) | st.text(max_size=5)},
    optional={
        "to_peer_id": st.sampled_from(["a", "b", "c", "zz"]) | json_values,
        "target": st.sampled_from(["a", "b", "c"]) | json_values,
        "from_peer_id": st.sampled_from(["a", "b"]) | json_values,
        "sender": st.sampled_from(["a", "b"]) | json_values,
        "peer_id": st.sampled_from(["a", "b"]) | json_values,
        "payload": json_values,
        "metadata": json_values | st.fixed_dictionaries({}, optional={"tags": json_values, "properties": json_values}),
        "filters": json_values
        | st.fixed_dictionaries(
            {},
            optional={
                "role": json_values,
                "tags": json_values,
                "tags_all": json_values,
                "unreserved": json_values,
                "properties": st.dictionaries(
                    st.text(max_size=3),
                    json_values
                    | st.dictionaries(
                        st.sampled_from(["$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists", "$x"]),
                        json_values,
                        max_size=2,
                    ),
                    max_size=2,
                ),
            },
        ),
        "duration_sec": json_values | st.integers(-5, 4000),
    },
).map(lambda m: m) | st.dictionaries(field_names, json_values, max_size=6)


@settings(max_examples=500, deadline=None)
@given(text=st.text(max_size=200) | json_values.map(lambda v: json.dumps(v)))
def test_decode_gives_a_dict_or_a_protocol_error(text):
    try:
        msg = decode(text)
    except E.ProtocolError as exc:
        assert exc.code in (E.INVALID_JSON, E.INVALID_MESSAGE)
        return
    assert isinstance(msg, dict) and isinstance(msg["type"], str)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(st.tuples(st.sampled_from(["a", "b", "c", "x"]), messages), max_size=25))
def test_room_survives_any_message(batch):
    room = RoomState("r", max_metadata_bytes=2048)
    for conn in ("a", "b", "c"):
        room.register(conn, peer_id=conn, subject=conn, role="worker", metadata={"tags": ["t"]}, token="t", now=0.0)
    now = 0.0
    for conn, msg in batch:
        now += 1.0
        raw = json.dumps(msg)
        try:  # every frame passes the real parser first, as on the wire
            parsed = decode(raw)
        except E.ProtocolError:
            continue
        fx = room.handle(conn, parsed, raw, now)
        for _, text in fx.sends:
            out = json.loads(text)
            assert isinstance(out, dict) and isinstance(out["type"], str)
            if out["type"] == "error" and "sender" not in out:  # (a peer's error routed to another has one)
                assert out["code"] in E.ALL_CODES and out["message"]
        room.expire(now)
    assert set(room.by_conn) <= {"a", "b", "c"}
