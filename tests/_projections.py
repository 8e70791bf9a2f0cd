"""A small projection for engine tests (importable by worker processes)."""

from __future__ import annotations

import msgspec

from eventstore import RecordedEvent, StreamSlice
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


class SlicedTally(TallyProjection):
    """TallyProjection with a batch fold: folds slices, and must agree with ``evolve``.

    ``seen`` collects the types of the decoded events each slice carried.
    """

    def __init__(self, name: str = "tally", *, poison: int | None = None,
                 snapshot_every: int | None = 10) -> None:
        super().__init__(name, poison=poison, snapshot_every=snapshot_every)
        self.seen: list[str] = []
        self.slices = 0

    def evolve_slice(self, state: Tally, events: StreamSlice) -> Tally:
        self.slices += 1
        count, total, writers, last = state.count, state.total, list(state.writers), \
            state.last_version
        for version, data in zip(events.versions, events.data, strict=True):
            self.seen.append(type(data).__name__)
            if not isinstance(data, CounterIncremented):
                continue
            if self.poison is not None and data.by == self.poison:
                raise ValueError(f"poison value {data.by}")
            count, total, last = count + 1, total + data.by, version
            writers = [*writers, data.writer][-3:]
        return Tally(count=count, total=total, writers=writers, last_version=last)
