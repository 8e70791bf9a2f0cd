"""Alembic environment: runs the revisions on a connection holding the migration lock.

eventstore.migrate() opens the transaction and takes the migration lock before Alembic runs, so
two processes migrating at once take turns; it hands that connection over here.  From the plain
``alembic`` command line (``sqlalchemy.url`` in the config, or ``-x url=...``), this file opens
the transaction and takes the lock itself, then runs whatever command was given (``upgrade``,
``downgrade``, ``current``, ``stamp``...); with ``--sql`` it prints the SQL instead.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Connection

VERSION_TABLE = "eventstore_alembic_version"

config = context.config
connection = config.attributes.get("connection")


def _run_on(conn: Connection) -> None:
    context.configure(connection=conn, version_table=VERSION_TABLE,
                      transactional_ddl=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if connection is not None:
    _run_on(connection)
else:
    from eventstore._backend import begin_write, create_store_engine, lock_migrations, resolve_url
    from eventstore.errors import InvalidArgument

    given = context.get_x_argument(as_dictionary=True).get("url") \
        or config.get_main_option("sqlalchemy.url") or os.environ.get("EVENTSTORE_URL")
    if not given:  # (not the store's default file: `alembic current` would create it)
        raise InvalidArgument("give the database: alembic -x url=URL ..., or EVENTSTORE_URL")
    url = resolve_url(given)
    if context.is_offline_mode():
        context.configure(url=url, version_table=VERSION_TABLE, literal_binds=True,
                          transactional_ddl=True, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    else:
        engine = create_store_engine(url)
        try:
            with begin_write(engine) as conn:
                lock_migrations(conn)
                _run_on(conn)
        finally:
            engine.dispose()
