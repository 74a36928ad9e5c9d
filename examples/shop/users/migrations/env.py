"""The Alembic environment of this service's migrations (written by `meshgate db init`).

meshgate runs it on a connection it opened to the database the caller named
(`meshgate db upgrade SERVICE --database-url URL`, MESHGATE_DATABASE_URL, or
meshgate.data.migrations.upgrade(url, folder)); no URL is kept here.

For `meshgate db revision SERVICE -m MESSAGE --autogenerate`, set target_metadata
to the metadata of your models (or expose `metadata` from the service's module).
Autogenerate leaves alone the tables your metadata does not name.
"""

from alembic import context

from meshgate.data.migrations import run_env

# from myservice.models import Base
# target_metadata = Base.metadata
target_metadata = None

run_env(context, target_metadata)
