"""Issue 10: the member registry in the state machine (``member`` commands, snapshot format 5)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from raftcoord.commands import Member, MemberChange
from raftcoord.store import Store
from raftcoord.values import decode_cbor, encode_cbor

N1 = Member("n1", "127.0.0.1:7001", "127.0.0.1:2379", True)
N2 = Member("n2", "127.0.0.1:7002", "127.0.0.1:2380", True)
N3 = Member("n3", "127.0.0.1:7003", "127.0.0.1:2381", False)


def apply(store: Store, cmd: MemberChange | dict[str, Any]) -> dict[str, Any]:
    m = cmd.to_map() if isinstance(cmd, MemberChange) else cmd
    return store.apply(encode_cbor(m)).result


def code(result: dict[str, Any]) -> str | None:
    return None if result.get("ok") else result["error"]["code"]


def test_issue10_seed_fills_an_empty_registry_once() -> None:
    s = Store()
    assert s.members == ()
    assert apply(s, MemberChange(action="seed", members=(N2, N1)))["seeded"] is True
    assert s.members == (N1, N2)  # sorted by name
    assert apply(s, MemberChange(action="seed", members=(N3,)))["seeded"] is False
    assert s.members == (N1, N2)


def test_issue10_add_promote_remove_and_their_refusals() -> None:
    s = Store()
    apply(s, MemberChange(action="seed", members=(N1,)))
    revision = s.revision
    assert apply(s, MemberChange(action="add", members=(N3,)))["member"]["voter"] is False
    assert code(apply(s, MemberChange(action="add", members=(N3,)))) == "conflict"
    same_raft = Member("n9", N1.raft, "127.0.0.1:9", True)
    assert code(apply(s, MemberChange(action="add", members=(same_raft,)))) == "conflict"
    assert apply(s, MemberChange(action="promote", name="n3"))["member"]["voter"] is True
    assert code(apply(s, MemberChange(action="promote", name="n3"))) == "conflict"
    assert code(apply(s, MemberChange(action="remove", name="nope"))) == "member_not_found"
    assert apply(s, MemberChange(action="remove", name="n1"))["ok"]
    assert code(apply(s, MemberChange(action="remove", name="n3"))) == "conflict"  # the last voter stays
    assert [m.name for m in s.members] == ["n3"]
    assert s.revision == revision  # the key space's revision does not move


@pytest.mark.parametrize("bad", [
    {"op": "member", "action": "jump", "name": "n1"},
    {"op": "member", "action": "add", "members": []},
    {"op": "member", "action": "add", "members": [{"name": "n1", "raft": "a", "client": "b", "voter": 1}]},
    {"op": "member", "action": "add", "members": [{"name": "", "raft": "a", "client": "b", "voter": True}]},
    {"op": "member", "action": "seed", "members": "n1"},
    {"op": "member", "action": "remove"},
    {"op": "member", "action": "remove", "name": 7},
])
def test_issue10_a_malformed_member_command_is_an_error_result_and_changes_nothing(bad: dict[str, Any]) -> None:
    s = Store()
    apply(s, MemberChange(action="seed", members=(N1,)))
    before = s.snapshot()
    result = apply(s, bad)
    assert not result["ok"] and result["error"]["code"] == "command"
    assert decode_cbor(s.snapshot())["members"] == decode_cbor(before)["members"]


def test_issue10_the_registry_survives_a_snapshot_and_format_4_restores_empty() -> None:
    s = Store()
    apply(s, MemberChange(action="seed", members=(N1, N2, N3)))
    assert Store.restore(s.snapshot()).members == (N1, N2, N3)
    old = decode_cbor(s.snapshot())
    old["format"] = 4
    del old["members"]
    assert Store.restore(encode_cbor(old)).members == ()
    s.clear_members()
    assert s.members == ()


_names = st.sampled_from(["n1", "n2", "n3", "n4"])
_changes = st.one_of(
    st.builds(lambda n, v: MemberChange(action="add", members=(Member(n, f"r-{n}", f"c-{n}", v),)), _names,
              st.booleans()),
    st.builds(lambda n: MemberChange(action="promote", name=n), _names),
    st.builds(lambda n: MemberChange(action="remove", name=n), _names),
)


@given(st.lists(_changes, max_size=30))
def test_issue10_registry_matches_a_plain_model(changes: list[MemberChange]) -> None:
    """Any sequence of changes: the registry is what a dict model says, and never loses its last voter."""
    s = Store()
    apply(s, MemberChange(action="seed", members=(N1,)))
    model = {"n1": N1}
    for change in changes:
        result = apply(s, change)
        if change.action == "add":
            m = change.members[0]
            ok = m.name not in model and all(x.raft != m.raft and x.client != m.client for x in model.values())
            if ok:
                model[m.name] = m
        elif change.action == "promote":
            ok = change.name in model and not model[change.name].voter
            if ok:
                old = model[change.name]
                model[old.name] = Member(old.name, old.raft, old.client, True)
        else:
            ok = change.name in model and not (model[change.name].voter
                                               and sum(x.voter for x in model.values()) == 1)
            if ok:
                del model[change.name]
        assert result["ok"] == ok, (change, result)
        assert s.members == tuple(model[n] for n in sorted(model))
        assert any(m.voter for m in s.members)
    assert Store.restore(s.snapshot()).members == s.members
