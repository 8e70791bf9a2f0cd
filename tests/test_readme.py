"""The README's Python examples run as written, on SQLite and on PostgreSQL.

They are copy-paste examples: each block runs in order in one fresh process, in an empty
directory, on the default store (``./eventstore.db``) or, for PostgreSQL, with
``EVENTSTORE_URL`` pointing at a new database migrated with ``eventstore migrate``, as the
README says to.  The blocks carry their own asserts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests._readme_runner import python_blocks
from tests.conftest import drop_pg_database, fresh_pg_database

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def test_every_python_block_is_found_and_only_one_is_skipped() -> None:
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 15
    skipped = [code for _line, code, skip in blocks if skip]
    assert len(skipped) == 1 and "import_crewai_sqlite" in skipped[0]


def _run(cwd: Path, url: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTSTORE_")}
    env["PYTHONPATH"] = str(ROOT)
    if url is not None:
        env["EVENTSTORE_URL"] = url
        subprocess.run([sys.executable, "-m", "eventstore", "migrate", "--url", url],
                       cwd=cwd, env=env, check=True, capture_output=True, timeout=120)
    return subprocess.run([sys.executable, "-m", "tests._readme_runner", str(README)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_readme_examples_run(backend: str, tmp_path: Path) -> None:
    url = fresh_pg_database() if backend == "postgres" else None
    try:
        done = _run(tmp_path, url)
    finally:
        if url is not None:
            drop_pg_database(url)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    out = done.stdout
    assert "README examples: all ran" in out
    assert "All about event sourcing (ship it)" in out          # the CrewAI flow resumed once
    assert "{'question': 'Refund order 8?', 'answer': 'no'}" in out   # the async graph resumed
    assert (tmp_path / "eventstore.db").exists() == (backend == "sqlite")
