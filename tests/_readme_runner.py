"""Run the README's Python examples in order, in one namespace, in the current directory.

``python -m tests._readme_runner README.md`` — used by ``tests/test_readme.py`` in a child
process, offline (CrewAI's opt-outs and the loopback-only network guard), so that what the
README shows is what the code does.  A block preceded by ``<!-- readme-test: skip ... -->`` is
not run (it needs something outside the project, such as CrewAI's own database).
"""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

SKIP = "<!-- readme-test: skip"
_FENCE = re.compile(r"^([ \t]*)```(\w*)[ \t]*\n(.*?)^\1```", re.S | re.M)


def python_blocks(readme: str) -> list[tuple[int, str, bool]]:
    """(line number, code, skipped) of every ```python block, in order."""
    out = []
    for m in _FENCE.finditer(readme):
        if m.group(2) != "python":
            continue
        line = readme.count("\n", 0, m.start()) + 1
        before = readme[:m.start()].rstrip().splitlines()
        skipped = bool(before) and before[-1].strip().startswith(SKIP)
        out.append((line, textwrap.dedent(m.group(3)), skipped))
    return out


def main(path: str) -> int:
    from tests._crewai_flows import offline

    blocks = python_blocks(Path(path).read_text(encoding="utf-8"))
    namespace: dict[str, object] = {"__name__": "__main__"}
    with offline():
        for line, code, skipped in blocks:
            if skipped:
                print(f"README.md:{line}: skipped", flush=True)
                continue
            print(f"README.md:{line}: running", flush=True)
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
    print("README examples: all ran", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
