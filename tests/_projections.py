"""A small projection for engine tests (importable by worker processes)."""

from __future__ import annotations

import msgspec

from eventstore import RecordedEvent
from projections import Projection, RowIndex
from tests._events import CounterIncremented


class Tally(msgspec.Struct, kw_only=True):
    count: int = 0
    total: int = 0
    writers: list[str] = msgspec.field(default_factory=list)
    last_version: int = 0


class TallyProjection(Projection[Tally]):
    """Counts CounterIncremented events per stream; fails on by == poison when set."""

    name = "tally"
    categories = ("counter",)
    state_type = Tally

    def __init__(self, name: str = "tally", *, poison: int | None = None,
                 snapshot_every: int | None = 10) -> None:
        self.name = name
        self.poison = poison
        self.snapshot_every = snapshot_every

    def initial(self, tenant_id: str, stream_id: str) -> Tally:
        return Tally()

    def evolve(self, state: Tally, event: RecordedEvent) -> Tally:
        data = event.data
        if not isinstance(data, CounterIncremented):
            return state
        if self.poison is not None and data.by == self.poison:
            raise ValueError(f"poison value {data.by}")
        if event.version != state.last_version + 1:
            raise AssertionError(f"gap or repeat: {state.last_version} -> {event.version}")
        return Tally(count=state.count + 1, total=state.total + data.by,
                     writers=[*state.writers, data.writer][-3:], last_version=event.version)

    def index(self, state: Tally) -> RowIndex:
        return RowIndex(status="big" if state.total >= 10 else "small", sort_key=state.total)
