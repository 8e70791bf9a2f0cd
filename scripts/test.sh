#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs the package with its dev extras into .venv,
# starts a throwaway PostgreSQL 15 on loopback (scripts/pg.sh), then runs ruff, mypy and pytest on
# both backends.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev,integration-tests,crewai]'

source scripts/pg.sh

echo "== ruff" && .venv/bin/ruff check .
echo "== mypy" && .venv/bin/mypy
echo "== pytest"
.venv/bin/python -m pytest -q "$@"
