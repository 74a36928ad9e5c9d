"""The ``meshgate`` command: thin commands over the library."""

from meshgate.cli import serve as _serve  # noqa: F401 - mounts its commands on app
from meshgate.cli import token as _token  # noqa: F401
from meshgate.cli import traces as _traces  # noqa: F401
from meshgate.cli import up as _up  # noqa: F401
from meshgate.cli.db import app as _db_app
from meshgate.cli.events import app as _events_app
from meshgate.cli.main import app, main, unwrap_help
from meshgate.cli.sagas import app as _sagas_app

app.add_typer(_db_app, name="db")
app.add_typer(_events_app, name="events")
app.add_typer(_sagas_app, name="sagas")
unwrap_help(app)

__all__ = ["app", "main"]
