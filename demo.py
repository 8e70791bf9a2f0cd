"""The eventstore demo on the embedded SQLite default.

Appends events, reads them back, follows new ones with a subscription, assigns conversation
variables and travels back in time, pauses an agent on a tool call and resumes it, then rebuilds
a projection by replay and checks it.  Run it with `bash scripts/demo.sh` (or `python demo.py`
once the package is installed); it uses EVENTSTORE_URL, else ./eventstore.db.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import uuid

import structlog

from eventstore import Event, EventStore, RecordedEvent, WrongExpectedVersion
from projections import Continuations, Conversations, rebuild, verify


class NoteAdded(Event, tag="demo.NoteAdded"):
    text: str


def show(ev: RecordedEvent) -> str:
    return f"  #{ev.position:<4} {ev.stream_id} v{ev.version} {ev.type}"


def main() -> None:
    # The application, not the library, configures logging: warnings and up on stderr.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    run = uuid.uuid4().hex[:8]
    with EventStore.open() as store:
        print(f"store: {store.url.render_as_string(hide_password=True)} ({store.backend})")

        # 1. Follow the log from its current end in the background.
        stop = threading.Event()
        seen: list[RecordedEvent] = []
        start = store.last_position() + 1
        follower = threading.Thread(
            target=lambda: seen.extend(store.subscribe(from_position=start, stop=stop)))
        follower.start()
        try:
            # 2. Append with optimistic concurrency and an idempotency key, then read back.
            notes = f"notes-{run}"
            r = store.append(notes, [NoteAdded(text="hello"), NoteAdded(text="world")],
                             expected_version=0, idempotency_key=f"req-{run}")
            again = store.append(notes, [NoteAdded(text="hello"), NoteAdded(text="world")],
                                 expected_version=0, idempotency_key=f"req-{run}")
            print(f"appended positions {r.first_position}..{r.last_position}; "
                  f"retry was a duplicate: {again.duplicate}")
            try:
                store.append(notes, [NoteAdded(text="late")], expected_version=1)
            except WrongExpectedVersion as e:
                print(f"stale writer refused: {e}")
            print("read back:", [e.data.text for e in store.read_stream(notes)])  # type: ignore[union-attr]

            # 3. Conversation variables: assign, read, time travel, history.
            conversations = Conversations(store)
            conv = f"c-{run}"
            v1 = conversations.assign(conv, {"count": 1, "topic": "billing"},
                                      workflow_run_id="run-7", node_id="assigner-1")
            conversations.assign(conv, {"count": 2}, expected_version=v1)
            print("variables now:", conversations.get(conv).variables)
            print("variables at version 1:", conversations.get(conv, at_version=1).variables)
            for h in conversations.history(conv):
                print(f"  v{h.version} {h.name}: {h.old!r} -> {h.new!r} (run {h.workflow_run_id})")

            # 4. A tool call pauses for a human; the client claims and resumes it.
            conts = Continuations(store)
            conts.pause(conv, "alice", messages=[{"role": "user", "content": "refund me"}],
                        pending_tool_calls=[{"id": "call-1", "name": "issue_refund"}],
                        tools=["issue_refund"], tool_schemas=[{"name": "issue_refund"}],
                        agent_config={"model": "any"})
            pending = conts.pending_for_user("alice")
            print("pending for alice:", [c.pending_tool_calls for c in pending])
            claimed = conts.claim(conv, "alice")
            conts.complete(conv, "alice", tool_results=[{"id": "call-1", "approved": True}],
                           claim_id=claimed.claim_id)
            print("after resume, pending:", conts.get(conv, "alice"))

            # 5. Replay is the truth: rebuild the conversation rows and verify them.
            gen = rebuild(store, conversations.projection)
            print(f"rebuilt conversations into generation {gen}; differences: "
                  f"{verify(store, conversations.projection)}")

            end = store.last_position()
            for _ in range(50):  # let the subscriber catch up with the log's end, then stop it
                if seen and seen[-1].position >= end:
                    break
                stop.wait(0.1)
        finally:  # also when printing fails (a closed pipe): the follower ends first
            stop.set()
            follower.join()
        print(f"the subscriber followed {len(seen)} new events:")
        for ev in seen:
            print(show(ev))
        print("stats:", store.stats())


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:  # `python demo.py | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
