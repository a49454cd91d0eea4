"""``skinml server start|stop|status``: the team tracking server (PostgreSQL + ``mlflow server``
with proxied artifacts), attached to the ``skinml`` group by :mod:`skinml.cli`."""

from __future__ import annotations

import functools
import json
import os

import click

DEFAULT_HOME = "team-server"


def _server_errors(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from skinml.team_server import TeamServerError

        try:
            return func(*args, **kwargs)
        except TeamServerError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


home_option = click.option(
    "--home", default=lambda: os.environ.get("SKINML_SERVER_HOME", DEFAULT_HOME), show_default=f"$SKINML_SERVER_HOME "
    f"or ./{DEFAULT_HOME}", type=click.Path(file_okay=False),
    help="Folder of the server's state: pgdata/, artifacts/, logs, the database password.")


@click.group("server")
def server() -> None:
    """Team tracking server: PostgreSQL for runs and the registry, MLflow proxying artifacts.

    Clients then set MLFLOW_TRACKING_URI=http://HOST:PORT and run every skinml command as usual.
    """


@server.command("start")
@home_option
@click.option("--pgdata", default=None, type=click.Path(file_okay=False),
              help="PostgreSQL cluster folder (created with initdb if missing). Default: HOME/pgdata.")
@click.option("--artifacts", default=None, type=click.Path(file_okay=False),
              help="Where the server stores the artifacts it proxies. Default: HOME/artifacts.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface the MLflow server binds (0.0.0.0 for the team's machines).")
@click.option("--port", default=5000, show_default=True, type=int, help="MLflow server port.")
@click.option("--db-port", default=5432, show_default=True, type=int, help="PostgreSQL port.")
@click.option("--db-host", default="127.0.0.1", show_default=True,
              help="Interface PostgreSQL listens on (only the MLflow server connects to it).")
@click.option("--workers", default=2, show_default=True, type=int, help="MLflow server worker processes.")
@click.option("--allowed-hosts", default=None,
              help="Host headers the server accepts beyond localhost and private IPs, e.g. mlflow.example.org.")
@click.option("--timeout", default=180, show_default=True, type=float, help="Seconds to wait for /health.")
@_server_errors
def start(home, pgdata, artifacts, host, port, db_port, db_host, workers, allowed_hosts, timeout):
    """Create (if needed) and start PostgreSQL, the database and the MLflow server."""
    from skinml import team_server

    extra = ["--allowed-hosts", allowed_hosts] if allowed_hosts else []
    config = team_server.ServerConfig(home=home, pgdata=pgdata, artifacts=artifacts, host=host, port=port,
                                      db_host=db_host, db_port=db_port, workers=workers, extra_server_args=extra)
    team_server.start(config, timeout=timeout)
    click.echo(f"team server running: {config.url} (PostgreSQL on {db_host}:{db_port}, data {config.pgdata}, "
               f"artifacts {config.artifacts})")
    click.echo(f"clients: export MLFLOW_TRACKING_URI={config.url}")


@server.command("stop")
@home_option
@_server_errors
def stop(home):
    """Stop the MLflow server, then PostgreSQL."""
    from skinml import team_server

    stopped = team_server.stop(team_server.ServerConfig.load(home))
    click.echo(", ".join(f"{name} {'stopped' if was else 'was not running'}" for name, was in stopped.items()))


@server.command("status")
@home_option
@_server_errors
def status(home):
    """Print whether PostgreSQL and the MLflow server run (JSON); exit 1 unless both do."""
    from skinml import team_server

    state = team_server.status(team_server.ServerConfig.load(home))
    click.echo(json.dumps(state, indent=2))
    if not (state["mlflow_healthy"] and state["postgres_running"]):
        raise SystemExit(1)
