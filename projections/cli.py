"""``eventstore projections …``: status, rebuild, verify, restart and run projectors.

Imported by :mod:`eventstore.cli` (listed in its ``PLUGIN_MODULES``).  Projections are found by
name in :func:`projections.registered`; ``--module`` imports more modules that register theirs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import threading
import time
from typing import Any

import msgspec

from eventstore import cli
from eventstore.cli import CliError, add_command, open_store, print_json

from ._engine import (
    Difference,
    Projection,
    ProjectionStatus,
    Projector,
    _check_seconds,
    build_registered,
    lease_clock,
    rebuild,
    registered,
    restart,
    status,
    verify,
)


def _projection(args: argparse.Namespace, name: str) -> Projection[Any]:
    cli.import_modules(args)
    factories = registered()
    if name not in factories:
        known = ", ".join(sorted(factories)) or "none"
        raise CliError(f"unknown projection {name!r} (known: {known})", cli.EXIT_USAGE)
    return build_registered(name)


class _Progress:
    """A one-line progress bar with events/s and ETA, drawn only on a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.start = time.monotonic()
        self.first: int | None = None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.first is None:
            self.first = 0
        elapsed = max(time.monotonic() - self.start, 1e-6)
        rate = done / elapsed
        frac = done / total if total else 1.0
        eta = (total - done) / rate if rate > 0 else 0.0
        width = 30
        bar = "#" * int(frac * width)
        sys.stderr.write(f"\r[{bar:<{width}}] {frac:6.1%} {done:,}/{total:,} events "
                         f"{rate:,.0f} ev/s ETA {int(eta) // 60}:{int(eta) % 60:02d}")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def cmd_status(args: argparse.Namespace) -> int:
    cli.import_modules(args)  # their projections' categories give their lag
    with open_store(args, existing=True) as store:
        rows = status(store, args.name)
        now = lease_clock(store)  # (what the leases run on: the server's clock)
    if args.name is not None and not rows:
        if args.name not in registered():
            raise CliError(f"projection {args.name!r} is not registered in this store",
                           cli.EXIT_USAGE)
        # Known to the code (a module registered it), not run on this database yet.
        if args.json:  # the keys of a status line, nothing recorded yet
            blank = {f.name: None for f in dataclasses.fields(ProjectionStatus)}
            print_json({**blank, "name": args.name, "status": "not_started", "lag": None})
        else:
            print(f"{args.name}: not run in this store yet")
        return cli.EXIT_OK
    if args.json:
        for r in rows:
            print_json({**dataclasses.asdict(r), "lag": r.lag})
        return cli.EXIT_OK
    if not rows:
        print("no projections registered in this store")
        return cli.EXIT_OK
    print(f"{'NAME':<24} {'STATUS':<10} {'GEN':>4} {'POSITION':>10} {'LAG':>8}  OWNER / ERROR")
    for r in rows:
        owner = r.owner or "-"
        if r.owner and r.lease_until is not None and r.lease_until < now:
            owner = f"{r.owner} (lease expired {r.lease_until:%Y-%m-%d %H:%M:%S}Z)"
        extra = r.error if r.status == "failed" else owner
        if r.error and r.status != "failed":  # a rebuild that stopped on an event
            extra = f"{extra}; {r.error}"
        if r.rebuild_generation is not None:
            extra = f"rebuilding gen {r.rebuild_generation} at {r.rebuild_position}; {extra}"
        print(f"{cli.printable(r.name):<24} {r.status:<10} {r.generation:>4} {r.position:>10} "
              f"{r.lag:>8}  {cli.printable(' '.join(str(extra).split()))}")
    return cli.EXIT_OK


def cmd_rebuild(args: argparse.Namespace) -> int:
    p = _projection(args, args.name)
    progress = _Progress(sys.stderr.isatty() and not args.json)
    with open_store(args, existing=True) as store:
        t0 = time.monotonic()
        gen = rebuild(store, p, progress=progress)
        progress.done()
        (st,) = status(store, p.name)
    secs = time.monotonic() - t0
    if args.json:
        print_json({"projection": p.name, "generation": gen, "position": st.position,
                    "seconds": round(secs, 3)})
    else:
        print(f"rebuilt {p.name}: generation {gen}, position {st.position}, {secs:.1f}s")
    return cli.EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    p = _projection(args, args.name)
    progress = _Progress(sys.stderr.isatty() and not args.json)
    with open_store(args, existing=True) as store:
        rows = status(store, p.name)  # verify changes none of it
        if not rows:
            said = f"{p.name}: not run in this store yet: no rows to verify"
            if args.json:  # no line, as for rows without differences; the note on stderr
                cli.report(said, "note")
            else:
                print(said)
            return cli.EXIT_OK
        for st in rows:
            if st.code_version != p.version:  # every row would differ: nothing to learn
                raise CliError(f"the rows of {p.name} were built by version {st.code_version} "
                               f"of its fold and this code has version {p.version}: verify "
                               f"them with the code that built them, or rebuild them")
        diffs = verify(store, p, progress=progress)
        progress.done()
    # The rows are compared up to where they are: say where a stopped one stopped.
    for st in (st for st in rows if st.status == "failed"):
        cli.report(f"projection {st.name} is stopped after a failure at position "
                   f"{st.failed_position}; its rows were compared up to position {st.position}",
                   "note")
    if args.json:
        for d in diffs:
            line = {"tenant_id": d.tenant_id, "stream_id": d.stream_id, "live": d.live,
                    "rebuilt": d.rebuilt}
            if d.columns:
                live, rebuilt = _differing(d)
                line.update(columns=list(d.columns), live_columns=live, rebuilt_columns=rebuilt)
            print_json(line)
    elif not diffs:
        print(f"{p.name}: live rows equal the replay of the log")
    else:
        for d in diffs:
            live, rebuilt = _differing(d)
            print(f"{d.tenant_id}/{d.stream_id}:\n  live:    "
                  f"{msgspec.json.encode(live).decode()}\n  rebuilt: "
                  f"{msgspec.json.encode(rebuilt).decode()}")
        print(f"{p.name}: {len(diffs)} stream(s) differ")
    return cli.EXIT_OK if not diffs else cli.EXIT_ERROR


def _differing(d: Difference) -> tuple[Any, Any]:
    """What differs, live and rebuilt: the states, or (equal states) the named row columns."""
    if not d.columns:
        return d.live, d.rebuilt
    return (dict(zip(d.columns, d.live_columns, strict=True)),
            dict(zip(d.columns, d.rebuilt_columns, strict=True)))


def cmd_restart(args: argparse.Namespace) -> int:
    cli.import_modules(args)  # (not needed to restart: accepted as by the other commands)
    with open_store(args, existing=True) as store:
        if not status(store, args.name):
            raise CliError(f"projection {args.name!r} is not registered in this store",
                           cli.EXIT_USAGE)
        restart(store, args.name)
    if args.json:
        print_json({"projection": args.name, "status": "running"})
    else:
        print(f"{args.name}: restarted")
    return cli.EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    cli.import_modules(args)  # first: "all registered" includes what --module registers
    names = args.names or sorted(registered())
    chosen = [_projection(args, n) for n in names]
    _check_seconds(args.lease_seconds, "lease_seconds")  # before a SQLite file is made
    if args.once:
        return _run_once(args, chosen)
    stop, started = threading.Event(), threading.Event()
    # From the start: a signal while the store opens ends the worker as well (exit 0).
    with (contextlib.suppress(cli.StopRequested), cli._stop_on_signals(stop, started),
          open_store(args, only_ours=True) as store):
        projector = Projector(store, chosen, worker_id=args.worker_id,
                              lease_seconds=args.lease_seconds)
        started.set()
        projector.run(stop)
    return cli.EXIT_OK


def _run_once(args: argparse.Namespace, chosen: list[Projection[Any]]) -> int:
    with open_store(args, only_ours=True) as store:
        projector = Projector(store, chosen, worker_id=args.worker_id,
                              lease_seconds=args.lease_seconds)
        try:
            # A failed projection does not keep the rest from catching up (as in `run`).
            n, _failures = projector.catch_up_each()
        finally:
            projector.release()  # let the next worker (or the next --once) in at once
        states = [(p, st) for p in chosen for st in status(store, p.name)]
        now = lease_clock(store)
    if args.json:  # the notes below still go to stderr
        print_json({"applied": n, "projections": [
            {"name": st.name, "status": st.status, "position": st.position, "lag": st.lag,
             "failed_position": st.failed_position} for _p, st in states]})
    else:
        print(f"applied {n} events")
    for _p, st in states:
        if st.name in projector.rebuilt_elsewhere and st.lag:
            cli.report(f"projection {st.name} is being rebuilt (generation "
                       f"{st.rebuild_generation}, at position {st.rebuild_position}) by "
                       f"another process: this run left it to that one (lag {st.lag})", "note")
        elif st.name in projector.held_elsewhere and st.lag:
            cli.report(f"projection {st.name}: another transaction held its row longer than "
                       f"this run waited, which left it (lag {st.lag})", "note")
        elif (st.owner and st.owner != projector.worker_id and st.status != "failed"
                and st.lease_until is not None and st.lease_until > now and st.lag):
            cli.report(f"projection {st.name} is leased by worker {st.owner} until "
                       f"{st.lease_until:%Y-%m-%d %H:%M:%S}Z, which runs it: this run "
                       f"applied nothing to it (lag {st.lag}); if that worker is gone, "
                       f"`eventstore projections restart {st.name}` drops its lease", "note")
    for st in (st for p, st in states if st.code_version > p.version):
        cli.report(f"the rows of {st.name} were built by a newer version of its fold "
                   f"({st.code_version}): this code leaves them alone; to roll back to "
                   f"it, run `eventstore projections rebuild {st.name}` with it", "note")
    failed = [st for _p, st in states if st.status == "failed"]
    for st in failed:  # a stopped projection applies nothing: not a success
        cli.report(f"projection {st.name} is stopped after a failure at position "
                   f"{st.failed_position}: {st.error}; fix it and run `eventstore "
                   f"projections restart {st.name}`")
    # Rows of an older fold this code's rebuild could not replace (status shows where it
    # stopped; the projection runs on the old rows): not a success either.
    unbuilt = [(p, st) for p, st in states if st.status != "failed"
               and st.code_version < p.version and st.failed_position is not None]
    for p, st in unbuilt:
        cli.report(f"projection {st.name}: the rebuild of its rows with this version of its "
                   f"fold ({p.version}) stopped at "
                   f"position {st.failed_position}: {st.error}; it runs on the rows of "
                   f"version {st.code_version}. Fix the fold, then run `eventstore projections "
                   f"restart {st.name}`")
    return cli.EXIT_ERROR if failed or unbuilt else cli.EXIT_OK


def _add(subparsers: cli.Subparsers) -> None:
    group = subparsers.add_parser(
        "projections", help="status, rebuild, verify, restart or run projections",
        description="Operate persisted projections.",
        parents=[cli._common_options(top=False)])  # also `projections --url U status`
    sub = group.add_subparsers(title="commands", dest="projections_command", metavar="COMMAND",
                               required=True)

    def module_option(p: argparse.ArgumentParser) -> None:
        cli.module_option(p, "it registers more projections")

    p = add_command(sub, "status", func=cmd_status, help="each projection's position and lag")
    p.add_argument("name", nargs="?", help="only this projection")
    module_option(p)
    p = add_command(sub, "rebuild", func=cmd_rebuild,
                    help="replay the log into fresh rows and swap them in when caught up")
    p.add_argument("name")
    module_option(p)
    p = add_command(sub, "verify", func=cmd_verify,
                    help="rebuild into scratch rows and print differences from the live rows")
    p.add_argument("name")
    module_option(p)
    p = add_command(sub, "restart", func=cmd_restart,
                    help="clear a failed projection (and its lease) so a projector retries")
    p.add_argument("name")
    module_option(p)
    p = add_command(sub, "run", func=cmd_run, help="run a projector until interrupted")
    p.add_argument("names", nargs="*", help="projections to run (default: all registered)")
    p.add_argument("--worker-id", help="this worker's id (default: host:pid:random)")
    p.add_argument("--lease-seconds", type=float, default=10.0)
    p.add_argument("--once", action="store_true", help="catch up once and exit")
    module_option(p)


cli.EXTRA_COMMANDS.append(_add)
