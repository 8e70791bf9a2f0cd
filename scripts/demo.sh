#!/usr/bin/env bash
# The demo on the embedded SQLite default: installs the package into .venv and runs demo.py,
# which appends events, reads them back, follows new ones and queries projections.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
# The demo uses $EVENTSTORE_URL when it is set: a PostgreSQL one needs the postgres extra.
extra=""
if [[ "${EVENTSTORE_URL:-}" == postgresql* ]]; then
  extra="[postgres]"
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extra}"
.venv/bin/python demo.py "$@"
