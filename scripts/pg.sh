#!/usr/bin/env bash
# Start a throwaway PostgreSQL 15 server on loopback for tests and benchmarks.
#   source scripts/pg.sh   -> exports EVENTSTORE_TEST_PG_URL, stops the server on shell exit
# Uses the machine's PostgreSQL 15 binaries (installing Debian's postgresql-15 when absent) and
# runs the server as the `postgres` user when started as root.
set -euo pipefail

pg_bindir() {
  local d
  for d in /usr/lib/postgresql/15/bin /usr/local/pgsql/bin; do
    [[ -x "$d/initdb" ]] && { echo "$d"; return 0; }
  done
  if command -v pg_config >/dev/null 2>&1 && [[ -x "$(pg_config --bindir)/initdb" ]]; then
    pg_config --bindir; return 0
  fi
  return 1
}

if ! PGBIN=$(pg_bindir); then
  echo "PostgreSQL 15 binaries not found; installing postgresql-15 from Debian" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 && apt-get install -y -qq postgresql-15 >&2
  PGBIN=$(pg_bindir) || { echo "cannot find PostgreSQL 15 after installing it" >&2; exit 1; }
fi

PGTEST_DIR=$(mktemp -d /tmp/eventstore-pg.XXXXXX)
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' \
    2>/dev/null || echo $(( 20000 + RANDOM % 20000 ))
}
PGTEST_PORT=${EVENTSTORE_TEST_PG_PORT:-$(free_port)}
as_pg() {
  if [[ $(id -u) -eq 0 ]]; then
    chown -R postgres:postgres "$PGTEST_DIR"
    su postgres -s /bin/bash -c "$*"
  else
    bash -c "$*"
  fi
}
PGUSER_NAME=$([[ $(id -u) -eq 0 ]] && echo postgres || id -un)
as_pg "'$PGBIN/initdb' -D '$PGTEST_DIR/data' -U '$PGUSER_NAME' -A trust --no-sync -E UTF8 >'$PGTEST_DIR/initdb.log' 2>&1" \
  || { cat "$PGTEST_DIR/initdb.log" >&2; exit 1; }
as_pg "'$PGBIN/pg_ctl' -D '$PGTEST_DIR/data' -l '$PGTEST_DIR/server.log' -w -t 60 start \
  -o \"-c listen_addresses=127.0.0.1 -p $PGTEST_PORT -c unix_socket_directories='$PGTEST_DIR' \
       -c max_connections=200 -c fsync=${EVENTSTORE_TEST_PG_FSYNC:-off} -c synchronous_commit=on \
       -c shared_buffers=256MB\"" >/dev/null \
  || { cat "$PGTEST_DIR/server.log" >&2; exit 1; }
as_pg "'$PGBIN/createdb' -h 127.0.0.1 -p $PGTEST_PORT -U '$PGUSER_NAME' eventstore_test"

stop_pg() {
  as_pg "'$PGBIN/pg_ctl' -D '$PGTEST_DIR/data' -m immediate stop" >/dev/null 2>&1 || true
  rm -rf "$PGTEST_DIR"
}
trap stop_pg EXIT
export EVENTSTORE_TEST_PG_URL="postgresql+psycopg://$PGUSER_NAME@127.0.0.1:$PGTEST_PORT/eventstore_test"
export EVENTSTORE_TEST_PG_ADMIN_URL="postgresql+psycopg://$PGUSER_NAME@127.0.0.1:$PGTEST_PORT/postgres"
echo "PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}') running at $EVENTSTORE_TEST_PG_URL" >&2
