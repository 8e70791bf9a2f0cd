"""Alembic environment: runs on the connection that eventstore._migrate hands over.

eventstore.migrate() opens the transaction and takes the migration lock before Alembic runs, so
two processes migrating at once take turns; this file only runs the revisions on that connection.
"""

from __future__ import annotations

from alembic import context

VERSION_TABLE = "eventstore_alembic_version"

config = context.config
connection = config.attributes.get("connection")

if connection is None:  # plain `alembic` command line: migrate the URL given in the config
    from eventstore._migrate import migrate_url

    migrate_url(config.get_main_option("sqlalchemy.url") or "")
else:
    context.configure(connection=connection, version_table=VERSION_TABLE,
                      transactional_ddl=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
