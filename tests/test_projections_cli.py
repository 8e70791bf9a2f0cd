"""``eventstore projections …`` run in-process: status, rebuild, verify, restart and run."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest
from sqlalchemy import select, update

from eventstore import EventStore
from eventstore._backend import begin_write
from eventstore._schema import projection_rows
from eventstore.cli import main
from projections import Conversations, Projector
from projections import _engine as engine
from projections.conversation import ConversationProjection
from projections.events import VariablesAssigned, VariableValue
from tests._events import CounterIncremented
from tests._projections import TallyProjection


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what set-up printed (unconfigured structlog logs to stdout)
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def json_lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def seed_conversations(url: str) -> None:
    """Three inline-projected variable events: c1 twice (tenant default), c2 once (acme)."""
    with EventStore.open(url) as store:
        conv = Conversations(store)
        conv.assign("c1", {"topic": "billing", "n": 1})
        conv.assign("c1", {"n": 2})
        conv.assign("c2", {"lang": "fr"}, tenant_id="acme")


def append_without_projection(url: str, conversation_id: str, n: int) -> None:
    """Variable events appended by a writer that does not run the inline projection."""
    with EventStore.open(url) as store:
        for i in range(n):
            store.append(f"conversation-{conversation_id}", [VariablesAssigned(
                conversation_id=conversation_id,
                variables=[VariableValue(name="i", value=i, value_type="integer")])])


def damage_c2(url: str) -> None:
    """Overwrite the live row of conversation c2 (tenant acme) with a wrong state."""
    with EventStore.open(url) as store, begin_write(store.engine) as conn:
        conn.execute(update(projection_rows).where(
            projection_rows.c.projection == "conversations",
            projection_rows.c.stream_id == "conversation-c2",
        ).values(state=b'{"conversation_id":"c2","variables":{"lang":"xx"},"version":1}'))


def row_of(url: str, stream: str, tenant: str = "default") -> tuple[Any, int] | None:
    with EventStore.open(url) as store:
        return engine.load_row(store, ConversationProjection(), tenant, stream)


def status_json(capsys: pytest.CaptureFixture[str], url: str, name: str) -> dict[str, Any]:
    code, out, _ = run(capsys, "projections", "status", name, "--url", url, "--json")
    assert code == 0
    (line,) = json_lines(out)
    return line


@pytest.fixture
def poisoned(monkeypatch: pytest.MonkeyPatch) -> str:
    """A registered tally projection that fails on increments by 13 (unregistered after)."""
    monkeypatch.setitem(engine._registry, "tally_cli",
                        lambda: TallyProjection("tally_cli", poison=13))
    return "tally_cli"


def test_status_prints_a_table_of_projections(url: str, capsys: pytest.CaptureFixture[str]
                                               ) -> None:
    """status prints one row per projection with its status, generation, position and lag."""
    seed_conversations(url)
    code, out, err = run(capsys, "projections", "status", "--url", url)
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split()[:5] == ["NAME", "STATUS", "GEN", "POSITION", "LAG"]
    (line,) = [r for r in rows if r.startswith("conversations ")]
    assert line.split()[:5] == ["conversations", "running", "1", "3", "0"]


def test_status_table_shows_a_rebuild_in_progress(url: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A projection whose rebuild is under way shows the generation it builds and how far."""
    seed_conversations(url)
    with EventStore.open(url) as store, begin_write(store.engine) as conn:
        conn.execute(update(engine.projections).where(
            engine.projections.c.name == "conversations").values(
            rebuild_generation=2, rebuild_position=1, rebuild_code_version=1))
    code, out, err = run(capsys, "projections", "status", "--url", url)
    assert code == 0, err
    (line,) = [r for r in out.splitlines() if r.startswith("conversations")]
    assert line.endswith("  rebuilding gen 2 at 1; -")
    code, out, _ = run(capsys, "projections", "status", "--url", url, "--json")
    (st,) = json_lines(out)
    assert (st["rebuild_generation"], st["rebuild_position"]) == (2, 1)


def test_status_table_marks_an_owner_whose_lease_ran_out(
        url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A worker killed while holding the lease stays the owner on record; the table says its
    lease has run out, so an operator does not take it for a live worker."""
    from sqlalchemy import update

    from eventstore._backend import begin_write
    from eventstore._schema import projections as projections_table

    with EventStore.open(url) as store:
        store.append("counter-a", [CounterIncremented(by=2)])
        Projector(store, [TallyProjection("tally_async")], worker_id="w-live").catch_up()
        Projector(store, [TallyProjection("tally_dead")], worker_id="w-dead").catch_up()
        with begin_write(store.engine) as conn:
            conn.execute(update(projections_table)
                         .where(projections_table.c.name == "tally_dead")
                         .values(lease_until=1_000_000))
    code, out, err = run(capsys, "projections", "status", "--url", url)
    assert code == 0, err
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert lines["tally_async"].endswith(" w-live")
    assert "w-dead (lease expired 1970-01-01 00:00:01Z)" in lines["tally_dead"]


def test_status_json_has_position_lag_and_owner(url: str, capsys: pytest.CaptureFixture[str]
                                                ) -> None:
    """status --json prints a JSON line with position, head, lag and the lease holder."""
    seed_conversations(url)
    with EventStore.open(url) as store:
        store.append("counter-a", [CounterIncremented(by=2)])
        Projector(store, [TallyProjection("tally_async")], worker_id="w-cli").catch_up()
        store.append("counter-a", [CounterIncremented(by=3)])
    code, out, err = run(capsys, "projections", "status", "--url", url, "--json")
    assert code == 0, err
    by_name = {line["name"]: line for line in json_lines(out)}
    assert by_name["conversations"]["position"] == 3
    tally = by_name["tally_async"]
    assert (tally["status"], tally["position"], tally["head"], tally["lag"]) == (
        "running", 4, 5, 1)
    assert tally["owner"] == "w-cli" and tally["lease_until"] is not None
    assert tally["generation"] == 1 and tally["error"] is None


def application_module(tmp_path: Any, monkeypatch: pytest.MonkeyPatch, module: str,
                       source: str) -> None:
    """An application module ``module`` on the path with ``source`` (the registry and the
    module are as before once the test ends)."""
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(engine, "_registry", dict(engine._registry))
    monkeypatch.delitem(sys.modules, module, raising=False)  # imported afresh


def module_registering(tmp_path: Any, monkeypatch: pytest.MonkeyPatch, module: str,
                       *names: str, poison: dict[str, int] | None = None) -> None:
    """An application module ``module`` that registers tally projections ``names`` (those in
    ``poison`` failing on its value)."""
    application_module(tmp_path, monkeypatch, module, (
        "from projections import register\n"
        "from tests._projections import TallyProjection\n"
        + "".join(f"register({name!r}, lambda: TallyProjection("
                  f"{name!r}, poison={(poison or {}).get(name)}))\n" for name in names)))


def test_status_module_gives_a_registered_projections_lag(
        url: str, capsys: pytest.CaptureFixture[str], tmp_path: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """status --module imports the application module that registers a projection, so its lag
    counts only its own categories (0 once caught up, whatever else the log holds)."""
    module_registering(tmp_path, monkeypatch, "status_mod", "tally_mod")
    with EventStore.open(url) as store:
        store.append("counter-a", [CounterIncremented(by=2)])
        Projector(store, [TallyProjection("tally_mod")]).catch_up()
        seed_conversations(url)  # three events of another category after it
    code, out, err = run(capsys, "projections", "status", "tally_mod", "--url", url, "--json",
                         "--module", "status_mod")
    assert code == 0, err
    (line,) = json_lines(out)
    assert (line["position"], line["head"], line["lag"]) == (1, 4, 0)


def test_status_without_the_module_counts_lag_in_the_recorded_categories(
        url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The bookkeeping row records the categories a projection folds, so status counts its lag
    in them also where its code is not loaded (an operator's shell without --module)."""
    with EventStore.open(url) as store:
        store.append("counter-a", [CounterIncremented(by=2)])
        Projector(store, [TallyProjection("tally_unloaded")]).catch_up()
        seed_conversations(url)  # three events of another category after it
        store.append("counter-b", [CounterIncremented(by=1)])  # and one of its own
    assert "tally_unloaded" not in engine._registry
    code, out, err = run(capsys, "projections", "status", "tally_unloaded", "--url", url,
                         "--json")
    assert code == 0, err
    (line,) = json_lines(out)
    assert (line["position"], line["head"], line["lag"], line["categories"]) == (
        1, 5, 1, ["counter"])


def test_run_without_names_runs_what_the_module_registers(
        url: str, capsys: pytest.CaptureFixture[str], tmp_path: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`projections run --module MOD` (no names: all registered) includes MOD's projections:
    a worker started that way ran only the built-in ones."""
    module_registering(tmp_path, monkeypatch, "run_mod", "tally_run_mod")
    with EventStore.open(url) as store:
        store.append("counter-a", [CounterIncremented(by=2)])
    code, out, err = run(capsys, "projections", "run", "--once", "--module", "run_mod",
                         "--url", url)
    assert (code, out) == (0, "applied 1 events\n"), err
    assert status_json(capsys, url, "tally_run_mod")["position"] == 1


def test_status_of_an_empty_store_says_none_registered(
        url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """status on a store without projections says so and exits 0."""
    EventStore.open(url).close()
    code, out, _ = run(capsys, "projections", "status", "--url", url)
    assert code == 0
    assert out.strip() == "no projections registered in this store"


def test_rebuild_swaps_in_the_next_generation(url: str, capsys: pytest.CaptureFixture[str]
                                              ) -> None:
    """rebuild conversations replays the log into generation 2 with the same states."""
    seed_conversations(url)
    before = row_of(url, "conversation-c1")
    code, out, err = run(capsys, "projections", "rebuild", "conversations", "--url", url)
    assert code == 0, err
    assert out.startswith("rebuilt conversations: generation 2, position 3,")
    assert status_json(capsys, url, "conversations")["generation"] == 2
    after = row_of(url, "conversation-c1")
    assert after is not None and after == before
    assert after[0].variables == {"topic": "billing", "n": 2}


def test_rebuild_json_reports_generation_and_position(
        url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """rebuild --json prints one object with projection, generation and position."""
    seed_conversations(url)
    code, out, err = run(capsys, "projections", "rebuild", "conversations", "--url", url,
                         "--json")
    assert code == 0, err
    (obj,) = json_lines(out)
    assert (obj["projection"], obj["generation"], obj["position"]) == ("conversations", 2, 3)


def test_verify_of_intact_rows_exits_0(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """verify conversations exits 0 and says the live rows equal the replay."""
    seed_conversations(url)
    code, out, err = run(capsys, "projections", "verify", "conversations", "--url", url)
    assert code == 0, err
    assert out.strip() == "conversations: live rows equal the replay of the log"


def test_verify_of_a_damaged_row_exits_1(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """verify exits 1 and names the stream whose live row differs from the replay."""
    seed_conversations(url)
    damage_c2(url)
    code, out, err = run(capsys, "projections", "verify", "conversations", "--url", url)
    assert code == 1, err
    assert "acme/conversation-c2:" in out and '"xx"' in out and '"fr"' in out
    assert "conversation-c1" not in out
    assert out.splitlines()[-1] == "conversations: 1 stream(s) differ"


def test_verify_json_lists_each_difference(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """verify --json prints one line per differing stream with the live and rebuilt states."""
    seed_conversations(url)
    damage_c2(url)
    code, out, _ = run(capsys, "projections", "verify", "conversations", "--url", url, "--json")
    assert code == 1
    (diff,) = json_lines(out)
    assert (diff["tenant_id"], diff["stream_id"]) == ("acme", "conversation-c2")
    assert diff["live"]["variables"] == {"lang": "xx"}
    assert diff["rebuilt"]["variables"] == {"lang": "fr"}


def test_verify_names_a_row_column_that_differs_when_the_states_are_equal(
        url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A live row whose state is right but whose version column is wrong: verify prints the
    differing column, live and rebuilt (text), and lists it with both values (JSON)."""
    seed_conversations(url)
    with EventStore.open(url) as store, begin_write(store.engine) as conn:
        conn.execute(update(projection_rows).where(
            projection_rows.c.projection == "conversations",
            projection_rows.c.stream_id == "conversation-c2").values(version=7))
    code, out, err = run(capsys, "projections", "verify", "conversations", "--url", url)
    assert code == 1, err
    assert out.splitlines()[:3] == ["acme/conversation-c2:", '  live:    {"version":7}',
                                    '  rebuilt: {"version":1}']
    code, out, _ = run(capsys, "projections", "verify", "conversations", "--url", url, "--json")
    assert code == 1
    (diff,) = json_lines(out)
    assert diff["live"] == diff["rebuilt"]
    assert (diff["columns"], diff["live_columns"], diff["rebuilt_columns"]) == (
        ["version"], {"version": 7}, {"version": 1})


def test_verify_reports_a_row_that_does_not_decode_as_a_difference(
        url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A live row damaged past decoding is a difference (its stored text and the decode
    error), in text and JSON, not the end of the verify."""
    seed_conversations(url)
    with EventStore.open(url) as store, begin_write(store.engine) as conn:
        conn.execute(update(projection_rows).where(
            projection_rows.c.projection == "conversations",
            projection_rows.c.stream_id == "conversation-c2").values(state=b"garbage"))
    code, out, err = run(capsys, "projections", "verify", "conversations", "--url", url)
    assert code == 1, err
    assert "acme/conversation-c2:" in out and "garbage" in out and "conversation-c1" not in out
    code, out, _ = run(capsys, "projections", "verify", "conversations", "--url", url, "--json")
    (diff,) = json_lines(out)
    assert diff["live"]["stored"] == "garbage" and "DecodeError" in diff["live"]["error"]
    assert diff["rebuilt"]["variables"] == {"lang": "fr"}


def test_verify_of_a_projection_never_run_here_writes_nothing(
        url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """verify of a projection with no rows in this store says so and leaves no trace (status
    still lists nothing for it)."""
    with EventStore.open(url) as store:
        store.append("counter-a", [CounterIncremented(by=1)])
        assert engine.verify(store, TallyProjection("tally_never")) == []
        assert engine.status(store, "tally_never") == []
    code, out, err = run(capsys, "projections", "verify", "conversations", "--url", url)
    assert code == 0, err
    assert out.strip() == "conversations: not run in this store yet: no rows to verify"
    code, out, err = run(capsys, "projections", "verify", "conversations", "--url", url, "--json")
    assert (code, out) == (0, "") and "not run in this store yet" in err  # stdout: JSON only
    with EventStore.open(url) as store:
        assert engine.status(store, "conversations") == []


def test_run_once_projects_what_was_appended(url: str, capsys: pytest.CaptureFixture[str]
                                             ) -> None:
    """run NAME --once catches up on events appended without the projection, and exits."""
    append_without_projection(url, "c9", 4)
    code, out, err = run(capsys, "projections", "run", "conversations", "--once", "--url", url)
    assert code == 0, err
    assert out.strip() == "applied 4 events"
    row = row_of(url, "conversation-c9")
    assert row is not None and row[1] == 4 and row[0].variables == {"i": 3}
    code, out, _ = run(capsys, "projections", "verify", "conversations", "--url", url)
    assert code == 0, out


def test_run_once_again_applies_only_new_events(url: str, capsys: pytest.CaptureFixture[str]
                                                ) -> None:
    """A second run --once by the same worker applies just the events appended since."""
    append_without_projection(url, "c9", 2)
    argv = ("projections", "run", "conversations", "--once", "--worker-id", "cron", "--url", url)
    assert run(capsys, *argv)[:2] == (0, "applied 2 events\n")
    assert run(capsys, *argv)[:2] == (0, "applied 0 events\n")
    append_without_projection(url, "c9", 3)
    assert run(capsys, *argv)[:2] == (0, "applied 3 events\n")
    row = row_of(url, "conversation-c9")
    assert row is not None and row[1] == 5


def test_run_once_releases_its_lease(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """After run --once exits, the next run --once (a new worker) applies the new events."""
    append_without_projection(url, "c9", 2)
    argv = ("projections", "run", "conversations", "--once", "--url", url)
    assert run(capsys, *argv)[:2] == (0, "applied 2 events\n")
    append_without_projection(url, "c9", 1)
    assert run(capsys, *argv)[:2] == (0, "applied 1 events\n")


def test_run_once_of_a_failing_projection_exits_1_and_shows_failed(
        url: str, poisoned: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A fold that raises makes run --once exit 1, and status shows the failed event."""
    with EventStore.open(url) as store:
        store.append("counter-a", [CounterIncremented(by=1)])
        store.append("counter-a", [CounterIncremented(by=13)])
    code, _, err = run(capsys, "projections", "run", poisoned, "--once", "--url", url)
    assert code == 1
    assert "failed on event at position 2" in err and "poison value 13" in err
    st = status_json(capsys, url, poisoned)
    assert (st["status"], st["failed_position"], st["position"]) == ("failed", 2, 1)
    code, out, _ = run(capsys, "projections", "status", "--url", url)
    (line,) = [r for r in out.splitlines() if r.startswith(poisoned)]
    assert " failed " in line and "poison value 13" in line
    # Run again while it is still stopped: nothing applied, and not a success either.
    code, out, err = run(capsys, "projections", "run", poisoned, "--once", "--url", url)
    assert code == 1 and "applied 0 events" in out
    assert f"projection {poisoned} is stopped after a failure at position 2" in err


def test_restart_clears_a_failure(url: str, poisoned: str, capsys: pytest.CaptureFixture[str]
                                  ) -> None:
    """restart sets a failed projection running again, and its projector retries the event."""
    with EventStore.open(url) as store:
        store.append("counter-a", [CounterIncremented(by=13)])
    assert run(capsys, "projections", "run", poisoned, "--once", "--url", url)[0] == 1
    code, out, err = run(capsys, "projections", "restart", poisoned, "--url", url)
    assert code == 0, err
    assert out.strip() == f"{poisoned}: restarted"
    st = status_json(capsys, url, poisoned)
    assert (st["status"], st["error"], st["failed_position"]) == ("running", None, None)
    assert run(capsys, "projections", "run", poisoned, "--once", "--worker-id", "again",
               "--url", url)[0] == 1  # still poisoned: it retried and failed again
    assert status_json(capsys, url, poisoned)["status"] == "failed"


def test_run_once_and_restart_speak_json_with_json(url: str, poisoned: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """With --json, run --once prints one object (events applied, each projection's state)
    and restart one object; the notes stay on stderr."""
    with EventStore.open(url) as store:
        store.append("counter-a", [CounterIncremented(by=1)])
        store.append("counter-a", [CounterIncremented(by=13)])
    code, out, err = run(capsys, "projections", "--url", url, "--json", "run", poisoned,
                         "--once")
    assert code == 1 and "stopped after a failure" in err
    (line,) = json_lines(out)
    assert line["applied"] == 1  # the event before the one that failed
    assert [(p["name"], p["status"], p["position"], p["failed_position"])
            for p in line["projections"]] == [(poisoned, "failed", 1, 2)]
    code, out, _ = run(capsys, "projections", "--url", url, "--json", "restart", poisoned)
    assert code == 0 and json_lines(out) == [{"projection": poisoned, "status": "running"}]


def test_restart_of_an_unregistered_projection_exits_2(
        url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """restart of a projection the store does not know is a usage error."""
    EventStore.open(url).close()
    code, out, err = run(capsys, "projections", "restart", "nope", "--url", url)
    assert code == 2 and out == ""
    assert err.strip() == "eventstore: error: projection 'nope' is not registered in this store"


@pytest.mark.parametrize("command", ["rebuild", "verify", "run"])
def test_unknown_projection_name_exits_2(url: str, command: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """rebuild, verify and run of a name no module registered exit 2, listing known names."""
    EventStore.open(url).close()
    code, out, err = run(capsys, "projections", command, "nope", "--url", url)
    assert code == 2 and out == ""
    assert err.startswith("eventstore: error: unknown projection 'nope' (known: ")
    assert "conversations" in err


def test_status_of_an_unregistered_projection_exits_2(
        url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """status of a name the store does not know is a usage error, not "none registered"."""
    seed_conversations(url)
    for extra in ([], ["--json"]):
        code, out, err = run(capsys, "projections", "status", "nope", "--url", url, *extra)
        assert code == 2 and out == ""
        assert err.strip() == "eventstore: error: projection 'nope' is not registered in this store"
    # A projection the code registers that never ran on this database is not an error.
    with EventStore.open(url) as store, begin_write(store.engine) as conn:
        conn.execute(engine.projections.delete().where(engine.projections.c.name == "jobs"))
    code, out, _ = run(capsys, "projections", "status", "jobs", "--url", url)
    assert (code, out.strip()) == (0, "jobs: not run in this store yet")
    code, out, _ = run(capsys, "projections", "status", "jobs", "--url", url, "--json")
    assert code == 0
    (line,) = json_lines(out)
    assert (line["name"], line["status"], line["position"]) == ("jobs", "not_started", None)
    assert set(line) == set(status_json(capsys, url, "conversations"))  # a status line's keys


def test_a_rebuild_stopped_by_an_event_shows_in_status_and_resumes(
        url: str, poisoned: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A rebuild whose fold raises exits 1 and leaves the event in status (error and
    failed_position), while the projection keeps running on its live rows; its partial rows
    are dropped, and rerun after the fix it starts over, swaps in and clears the error."""
    with EventStore.open(url) as store:
        store.append("counter-a", [CounterIncremented(by=1)])
        store.append("counter-a", [CounterIncremented(by=13)])
        engine.ensure_registered(store, TallyProjection(poisoned))
    code, _, err = run(capsys, "projections", "rebuild", poisoned, "--url", url)
    assert code == 1 and "failed on event at position 2" in err
    st = status_json(capsys, url, poisoned)
    assert (st["status"], st["failed_position"], st["rebuild_generation"]) == ("running", 2,
                                                                                None)
    assert "rebuild of generation 2 stopped" in st["error"] and "poison value 13" in st["error"]
    code, out, _ = run(capsys, "projections", "status", "--url", url)
    (line,) = [r for r in out.splitlines() if r.startswith(poisoned)]
    assert " running " in line and "poison value 13" in line
    with EventStore.open(url) as store, store.engine.connect() as conn:
        assert conn.execute(select(projection_rows.c.generation).where(
            projection_rows.c.projection == poisoned)).all() == []  # the partial rows went
    monkeypatch.setitem(engine._registry, poisoned, lambda: TallyProjection(poisoned))  # fixed
    assert run(capsys, "projections", "rebuild", poisoned, "--url", url)[0] == 0
    st = status_json(capsys, url, poisoned)
    assert (st["status"], st["error"], st["failed_position"], st["generation"],
            st["rebuild_generation"], st["position"]) == ("running", None, None, 2, None, 2)


def test_a_failed_rebuild_keeps_the_failure_a_projector_recorded(
        url: str, poisoned: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A projection a projector stopped at one event, then rebuilt and stopped at another,
    still shows the projector's failure (the event that stops its live rows)."""
    with EventStore.open(url) as store:
        store.append("counter-a", [CounterIncremented(by=1)])
        store.append("counter-a", [CounterIncremented(by=13)])
    assert run(capsys, "projections", "run", poisoned, "--once", "--url", url)[0] == 1
    before = status_json(capsys, url, poisoned)
    assert (before["status"], before["failed_position"]) == ("failed", 2)
    assert run(capsys, "projections", "rebuild", poisoned, "--url", url)[0] == 1
    after = status_json(capsys, url, poisoned)
    assert (after["status"], after["error"], after["failed_position"],
            after["rebuild_generation"]) == ("failed", before["error"], 2, None)


@pytest.mark.parametrize("command", [["status"], ["rebuild", "conversations"],
                                     ["run", "--once"], ["restart", "conversations"],
                                     ["status", "--module", ".relative"]])
def test_a_module_that_is_not_there_exits_2(url: str, command: list[str],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """--module naming a module that cannot be found is a usage error (exit 2), not an
    unexpected ModuleNotFoundError."""
    code, out, err = run(capsys, "projections", *command, "--module", "no_such_module_x",
                         "--url", url)
    assert (code, out) == (2, "")
    assert "--module " in err and ("no module named 'no_such_module_x'" in err
                                   or "give an absolute module name" in err)


@pytest.mark.parametrize("value", ["nan", "inf", "1e300", "0"])
def test_run_refuses_a_lease_that_is_no_number_of_seconds(
        url: str, value: str, capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
    """--lease-seconds nan, inf, 1e300 or 0 exits 2 with the argument named."""
    code, _, err = run(capsys, "projections", "run", "--once", "--lease-seconds", value,
                       "--url", url)
    assert code == 2 and "lease_seconds must be a number of seconds" in err
    missing = f"sqlite:///{tmp_path / 'not_made.db'}"
    code, _, _ = run(capsys, "projections", "run", "--once", "--lease-seconds", value,
                     "--url", missing)
    assert code == 2 and not (tmp_path / "not_made.db").exists()  # refused before opening


def test_common_options_may_follow_projections(url: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """--url and --json work between `projections` and its command, as elsewhere."""
    seed_conversations(url)
    code, out, _ = run(capsys, "projections", "--url", url, "--json", "status", "conversations")
    assert code == 0 and json_lines(out)[0]["name"] == "conversations"


def test_verify_of_a_stopped_projection_says_how_far_it_compared(
        url: str, poisoned: str, capsys: pytest.CaptureFixture[str]) -> None:
    """verify of a projection stopped after a failure notes that its rows (and so the
    comparison) end at its position."""
    with EventStore.open(url) as store:
        store.append("counter-a", [CounterIncremented(by=1)])
        store.append("counter-a", [CounterIncremented(by=13)])
    assert run(capsys, "projections", "run", poisoned, "--once", "--url", url)[0] == 1
    code, out, err = run(capsys, "projections", "verify", poisoned, "--url", url)
    assert code == 0 and "live rows equal the replay" in out
    assert (f"projection {poisoned} is stopped after a failure at position 2; its rows were "
            f"compared up to position 1") in err


def test_older_code_says_it_left_rows_a_newer_fold_keeps(
        url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Against rows a newer fold version keeps, run --once of older code says it left them
    alone, and verify refuses to compare rows of another fold version (all would differ)."""
    class TallyV2(TallyProjection):
        version = 2

    with EventStore.open(url) as store:
        store.append("counter-a", [CounterIncremented(by=1)])
    monkeypatch.setitem(engine._registry, "tally_v", lambda: TallyV2("tally_v"))
    assert run(capsys, "projections", "run", "tally_v", "--once", "--url", url)[0] == 0
    monkeypatch.setitem(engine._registry, "tally_v", lambda: TallyProjection("tally_v"))
    code, out, err = run(capsys, "projections", "run", "tally_v", "--once", "--url", url)
    assert code == 0 and "applied 0 events" in out
    assert "built by a newer version of its fold (2): this code leaves them alone" in err
    code, out, err = run(capsys, "projections", "verify", "tally_v", "--url", url)
    assert (code, out) == (2, "")
    assert "built by version 2 of its fold and this code has version 1" in err


def test_run_once_catches_up_the_rest_past_a_failed_projection_and_names_leases(
        url: str, capsys: pytest.CaptureFixture[str], tmp_path: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """run --once: a projection that fails is reported (exit 1) and the others still catch up;
    one another worker holds the lease of is named, with how to drop a dead worker's lease."""
    module_registering(tmp_path, monkeypatch, "once_mod", "tally_a_bad", "tally_b_leased",
                       "tally_c_good", poison={"tally_a_bad": 13})
    with EventStore.open(url) as store:
        store.append("counter-a", [CounterIncremented(by=1)])
        Projector(store, [TallyProjection("tally_b_leased")], worker_id="gone",
                  lease_seconds=3600).catch_up()
        store.append("counter-b", [CounterIncremented(by=13)])
    code, out, err = run(capsys, "projections", "run", "--once", "--url", url,
                         "--module", "once_mod")
    assert code == 1
    # tally_c_good: 2; tally_a_bad: 1, the event before the one it fails on
    assert "applied 3 events" in out, err
    assert "projection tally_a_bad is stopped after a failure at position 2" in err
    assert "projection tally_b_leased is leased by worker gone until" in err
    assert "projections restart tally_b_leased` drops its lease" in err
    with EventStore.open(url) as store:
        by_name = {st.name: st for st in engine.status(store)}
    assert by_name["tally_c_good"].position == 2 and by_name["tally_b_leased"].position == 1
    assert by_name["tally_a_bad"].position == 1
    code, out, err = run(capsys, "projections", "restart", "tally_b_leased", "--url", url)
    assert code == 0, err
    code, out, err = run(capsys, "projections", "run", "--once", "--url", url,
                         "--module", "once_mod")
    assert "applied 1 events" in out and code == 1, err  # (tally_a_bad: still failed)


def test_a_projection_registered_under_another_name_is_refused(
        url: str, capsys: pytest.CaptureFixture[str], tmp_path: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """register(name, factory) whose projection has another name would run, rebuild and show
    two different names: the command line refuses it, naming both (exit 2)."""
    application_module(tmp_path, monkeypatch, "alias_mod", (
        "from projections import register\n"
        "from tests._projections import TallyProjection\n"
        "register('tally_alias', lambda: TallyProjection('tally_real'))\n"))
    for command in (["rebuild", "tally_alias"], ["run", "--once", "tally_alias"]):
        code, _, err = run(capsys, "projections", *command, "--url", url,
                           "--module", "alias_mod")
        assert code == 2 and "registered as 'tally_alias' is named 'tally_real'" in err, err
    with pytest.raises(engine.InvalidArgument):
        engine.register("x", "not a factory")  # type: ignore[arg-type]


def test_run_once_names_a_projection_another_process_is_rebuilding(
        url: str, capsys: pytest.CaptureFixture[str], tmp_path: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """run --once that finds another process rebuilding a projection (its rows of an older
    fold version) leaves it to that one and says so, rather than report 0 events as done."""
    from projections.errors import RebuildInProgress

    application_module(tmp_path, monkeypatch, "bumped_mod", (
        "from projections import register\n"
        "from tests._projections import TallyProjection\n"
        "class Bumped(TallyProjection):\n"
        "    version = 2\n"
        "register('tally_bumped', lambda: Bumped('tally_bumped'))\n"))
    with EventStore.open(url) as store:
        store.append("counter-a", [CounterIncremented(by=1)])
        first = Projector(store, [TallyProjection("tally_bumped")])
        first.catch_up()
        first.release()
        store.append("counter-a", [CounterIncremented(by=1)])

    def elsewhere(*args: Any, **kwargs: Any) -> int:
        with EventStore.open(url) as store, begin_write(store.engine) as conn:
            conn.execute(update(engine.projections).where(
                engine.projections.c.name == "tally_bumped").values(
                rebuild_generation=2, rebuild_position=1, rebuild_code_version=2))
        raise RebuildInProgress("being rebuilt by another process", reason="rebuilding")

    monkeypatch.setattr(engine, "_rebuild", elsewhere)
    code, out, err = run(capsys, "projections", "run", "--once", "tally_bumped", "--url", url,
                         "--module", "bumped_mod")
    assert code == 0 and "applied 0 events" in out
    assert "projection tally_bumped is being rebuilt (generation 2, at position 1) by another " \
           "process: this run left it to that one (lag 1)" in err


def test_run_once_exits_1_when_its_rebuild_of_older_rows_fails(
        url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A new release's `run --once` whose fold fails while rebuilding the rows the older fold
    built: the projection goes on running on those rows (status shows the failure), and the
    run exits 1 saying so, also run again (it exited 0 with "applied 0 events": a deploy
    script went on past a broken fold)."""
    from projections import inline

    class TallyV2(TallyProjection):
        version = 2

    monkeypatch.setitem(engine._registry, "tally_v", lambda: TallyV2("tally_v", poison=13))
    with EventStore.open(url) as store:
        inline(store, TallyProjection("tally_v"))
        for by in (1, 13, 1):
            store.append("counter-a", [CounterIncremented(by=by)])
    for _ in range(2):
        code, out, err = run(capsys, "projections", "run", "tally_v", "--once", "--url", url)
        assert code == 1 and "applied 0 events" in out, (out, err)
        assert "the rebuild of its rows with this version of its fold (2) stopped at " \
               "position 2" in err and "runs on the rows of version 1" in err, err
        st = status_json(capsys, url, "tally_v")
        assert (st["status"], st["code_version"], st["failed_position"]) == ("running", 1, 2)
