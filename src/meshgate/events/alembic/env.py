"""The Alembic environment of meshgate's own event tables (outbox, inbox, sagas).

Run through meshgate.events.migrations.upgrade (or `meshgate db upgrade` of a
service that uses events), never by alembic itself: meshgate opens the connection.
"""

from alembic import context

from meshgate.data.migrations import run_env

run_env(context, None)
