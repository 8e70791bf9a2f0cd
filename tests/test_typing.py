"""The public API as a type checker sees it: user code checked with ``mypy --strict``.

Mistakes that fail at run time must fail the user's type check too: an event built
positionally or changed after it was made, a projection read through ``run_read`` with a
misspelt keyword or an attribute its state lacks.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

USER_CODE = '''
from __future__ import annotations

import msgspec

from eventstore import Event, RecordedEvent, WrongExpectedVersion
from eventstore.aio import AsyncEventStore
from projections import Projection, current, load_row, query_rows
from projections.aio import run_read


class NoteAdded(Event, tag="typing.NoteAdded"):
    attempt: int = 1
    text: str  # (a required field after a defaulted one: events are keyword-only)


class Totals(msgspec.Struct):
    count: int = 0


class Counting(Projection[Totals]):
    name = "typing_counting"
    state_type = Totals

    def initial(self, tenant_id: str, stream_id: str) -> Totals:
        return Totals()

    def evolve(self, state: Totals, event: RecordedEvent) -> Totals:
        return Totals(state.count + 1)


def expected_of(e: WrongExpectedVersion) -> int:
    return e.expected if isinstance(e.expected, int) else -1


async def reads(store: AsyncEventStore) -> int:
    rows = await run_read(store, query_rows, Counting(), tenant_id="acme")
    state, _version = await run_read(store, current, Counting(), "c-1", tenant_id="acme")
    row = await run_read(store, load_row, Counting(), "acme", "c-1")
    return len(rows) + state.count + (row[1] if row else 0)


async def mistakes(store: AsyncEventStore) -> None:
    NoteAdded("hi")  # E1
    note = NoteAdded(text="hi")
    note.text = "changed"  # E2
    await run_read(store, query_rows, Counting(), tenant="acme")  # E3
    state, _ = await run_read(store, current, Counting(), "c-1", tenant_id="acme")
    state.missing  # E4
'''


@pytest.mark.slow
def test_user_code_type_checks_and_its_mistakes_are_caught(tmp_path: Path) -> None:
    user = tmp_path / "user_code.py"
    user.write_text(textwrap.dedent(USER_CODE))
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--cache-dir",
         str(tmp_path / ".mypy_cache"), "--config-file", "/dev/null", str(user)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    lines = USER_CODE.splitlines()
    flagged = sorted({lines[int(line.split(":")[1]) - 1].split("# ")[-1] for line in errors})
    assert flagged == ["E1", "E2", "E3", "E4"], result.stdout
