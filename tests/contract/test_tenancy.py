"""Tenancy: no call returns, counts or changes another tenant's events."""

from __future__ import annotations

import pytest

from eventstore import EventStore, WrongExpectedVersion
from tests._events import NoteAdded


def test_same_stream_id_in_two_tenants_is_two_streams(store: EventStore) -> None:
    """Each tenant's stream has its own versions and events."""
    store.append("conversation-1", [NoteAdded(text="a1"), NoteAdded(text="a2")], tenant_id="a")
    store.append("conversation-1", [NoteAdded(text="b1")], tenant_id="b", expected_version=0)
    assert store.stream_version("conversation-1", tenant_id="a") == 2
    assert store.stream_version("conversation-1", tenant_id="b") == 1
    assert store.stream_version("conversation-1") == 0
    assert [e.data.text for e in store.read_stream("conversation-1", tenant_id="b")] == ["b1"]  # type: ignore[union-attr]
    assert {e.tenant_id for e in store.read_stream("conversation-1", tenant_id="a")} == {"a"}


def test_read_all_and_subscribe_filter_by_tenant(store: EventStore) -> None:
    """read_all(tenant_id=…) and stats(tenant_id=…) see only that tenant."""
    store.append("c-1", [NoteAdded(text="a")], tenant_id="a")
    store.append("c-1", [NoteAdded(text="b")], tenant_id="b")
    store.append("c-2", [NoteAdded(text="a")], tenant_id="a")
    assert [e.position for e in store.read_all(tenant_id="a")] == [1, 3]
    assert [e.position for e in store.read_all(tenant_id="b")] == [2]
    assert store.stats(tenant_id="a")["events"] == 2
    assert store.stats(tenant_id="b") == {"events": 1, "streams": 1, "tenants": 1,
                                           "last_position": 2}


def test_version_check_uses_the_callers_tenant(store: EventStore) -> None:
    """Another tenant's events do not count towards the expected version."""
    store.append("c-1", [NoteAdded(text="a")], tenant_id="a")
    with pytest.raises(WrongExpectedVersion) as info:
        store.append("c-1", [NoteAdded(text="b")], tenant_id="b", expected_version=1)
    assert info.value.actual == 0 and info.value.tenant_id == "b"


def test_stats_count_each_tenant_once(store: EventStore) -> None:
    store.append("c-1", [NoteAdded(text="a")], tenant_id="a")
    store.append("c-2", [NoteAdded(text="a")], tenant_id="a")
    store.append("c-1", [NoteAdded(text="b")], tenant_id="b")
    assert store.stats() == {"events": 3, "streams": 3, "tenants": 2, "last_position": 3}


def test_stream_reads_bound_and_order_by_version_among_other_streams(store: EventStore) -> None:
    """A stream's range is in its own versions, also when other streams' events sit between its
    own in the log (versions and positions then differ)."""
    for i in range(1, 4):
        store.append("c-1", [NoteAdded(text=f"other{i}")], tenant_id="a")
        store.append("c-1", [NoteAdded(text=f"own{i}")], tenant_id="b")
    read = store.read_stream("c-1", tenant_id="b", from_version=2, to_version=3)
    assert [(e.version, e.position) for e in read] == [(2, 4), (3, 6)]
    read = store.read_stream("c-1", tenant_id="b", from_version=1, to_version=2, backwards=True)
    assert [e.data.text for e in read] == ["own2", "own1"]  # type: ignore[union-attr]
