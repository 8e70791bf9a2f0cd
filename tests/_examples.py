"""How many examples the property tests try, and how they choose them.

The suite runs each property test on the same examples every time (Hypothesis's
``derandomize``), on a developer's machine as in CI: a failure CI reports is one a local run of
the whole suite meets again, and a passing commit does not fail later on an example a new seed
drew.  Finding new failures is a separate, longer run: ``EVENTSTORE_TEST_HUNT=500 pytest
tests/test_langgraph_model.py`` draws fresh examples, 500 per test.
"""

from __future__ import annotations

import os

from hypothesis import settings

HUNT = os.environ.get("EVENTSTORE_TEST_HUNT", "").strip()

settings.register_profile("suite", derandomize=True, database=None, print_blob=True,
                          report_multiple_bugs=False)
settings.register_profile("hunt", print_blob=True)
settings.load_profile("hunt" if HUNT else "suite")


def examples(usual: int) -> int:
    """``usual`` in the suite; the hunt's count when ``EVENTSTORE_TEST_HUNT`` gives one."""
    return int(HUNT) if HUNT else usual
