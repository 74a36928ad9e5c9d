"""The Alembic environment of this service's migrations (written by `meshgate db init`).

meshgate runs it on a connection it opened to the database the caller named
(`meshgate db upgrade SERVICE --database-url URL`, MESHGATE_DATABASE_URL, or
meshgate.data.migrations.upgrade(url, folder)); no URL is kept here.
"""

from alembic import context
from examples.shop.payments.models import Base

from meshgate.data.migrations import run_env

run_env(context, Base.metadata)
