"""A team tracking server: PostgreSQL holds runs and the Model Registry, ``mlflow server``
proxies the artifacts (``--serve-artifacts``) into one folder.

skinml's default store (SQLite ``mlflow.db`` + local ``mlruns/``) suits one person on one
machine; several people or several training jobs need a server that many processes write to at
once, and clients that hold no files of their own. Clients only set
``MLFLOW_TRACKING_URI=http://HOST:PORT``: every run's artifacts go through the server.

Everything the server needs lives in one folder (``home``)::

    home/pgdata/          the PostgreSQL cluster (owned by the database's OS user)
    home/artifacts/       the proxied artifact store
    home/server.json      ports and paths, so `stop` and `status` need only the folder
    home/db-password      the password of the database role the MLflow server logs in as
    home/mlflow-server.log, home/mlflow-server.pid

PostgreSQL refuses to run as root, so a root caller runs it as the OS user ``postgres``
(created by Debian's ``postgresql`` package) through ``runuser``; any other caller runs it as
itself. No MLflow import here: the server is a separate process.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

PG_BIN_ENV = "SKINML_PG_BIN"
HOME_ENV = "SKINML_SERVER_HOME"
DB_NAME = "skinml"
DB_ROLE = "skinml"
ROOT_DB_USER = "postgres"
#: A Unix socket path must fit in sockaddr_un (107 bytes plus the terminating NUL).
_SOCKET_PATH_MAX = 107


class TeamServerError(RuntimeError):
    """The database or the MLflow server could not be set up, started or stopped."""


@dataclass
class ServerConfig:
    """Where the team server keeps its data and where it listens."""

    home: Path
    pgdata: Path | None = None
    artifacts: Path | None = None
    host: str = "127.0.0.1"
    port: int = 5000
    db_host: str = "127.0.0.1"
    db_port: int = 5432
    workers: int = 2
    extra_server_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.home = Path(self.home).resolve()
        self.pgdata = Path(self.pgdata).resolve() if self.pgdata else self.home / "pgdata"
        self.artifacts = Path(self.artifacts).resolve() if self.artifacts else self.home / "artifacts"
        self.port = int(self.port)
        self.db_port = int(self.db_port)
        self.workers = int(self.workers)

    @property
    def url(self) -> str:
        """The address clients put in ``MLFLOW_TRACKING_URI``."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def state_file(self) -> Path:
        return self.home / "server.json"

    @property
    def password_file(self) -> Path:
        return self.home / "db-password"

    @property
    def pid_file(self) -> Path:
        return self.home / "mlflow-server.pid"

    @property
    def server_log(self) -> Path:
        return self.home / "mlflow-server.log"

    @property
    def postgres_log(self) -> Path:
        # Inside pgdata: pg_ctl opens it as the database's OS user, who may not write to home.
        return self.pgdata / "postgres.log"

    def save(self) -> None:
        data = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}
        self.state_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, home: str | os.PathLike) -> ServerConfig:
        """The configuration a previous `start` saved in ``home``."""
        state = Path(home).resolve() / "server.json"
        if not state.is_file():
            raise TeamServerError(f"no team server was started in {Path(home).resolve()} ({state.name} is missing)")
        return cls(**json.loads(state.read_text()))


# --------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------

def pg_bin_dir() -> Path:
    """The folder with ``initdb`` and ``pg_ctl``: ``$SKINML_PG_BIN``, else the newest Debian
    install under /usr/lib/postgresql, else wherever ``initdb`` is on PATH."""
    if os.environ.get(PG_BIN_ENV):
        folder = Path(os.environ[PG_BIN_ENV])
        if not (folder / "initdb").is_file():
            raise TeamServerError(f"${PG_BIN_ENV}={folder} holds no initdb")
        return folder
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                    key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if debian:
        return debian[-1].parent
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise TeamServerError("PostgreSQL's initdb was not found: install the server (Debian/Ubuntu: "
                          f"`apt-get install postgresql`) or set ${PG_BIN_ENV} to the folder holding initdb")


def db_os_user() -> str | None:
    """The OS user that owns and runs the cluster: ``postgres`` for root (initdb refuses root),
    else None (the caller itself)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(ROOT_DB_USER)
    except KeyError:
        raise TeamServerError(
            f"running as root, the database must run as the unprivileged user {ROOT_DB_USER!r}, which does "
            f"not exist: `apt-get install postgresql` creates it, or `useradd --system {ROOT_DB_USER}`") from None
    return ROOT_DB_USER


def _as_db_user(command: list[str]) -> list[str]:
    user = db_os_user()
    return ["runuser", "-u", user, "--", *command] if user else command


def _run(command: list[str], what: str, input_text: str | None = None, timeout: float = 120) -> str:
    try:
        done = subprocess.run(command, input=input_text, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise TeamServerError(f"{what} did not finish within {timeout:.0f} s: {' '.join(command)}") from exc
    if done.returncode != 0:
        raise TeamServerError(f"{what} failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()}")
    return done.stdout


def socket_dir(config: ServerConfig) -> Path:
    """pgdata itself (private to the database user) when the socket path fits, else /tmp."""
    if len(str(config.pgdata / f".s.PGSQL.{config.db_port}")) <= _SOCKET_PATH_MAX:
        return config.pgdata
    return Path("/tmp")


def _superuser() -> str:
    """The cluster's superuser is named after its OS user, so peer authentication on the
    socket lets that user (and only it) administer the cluster without a password."""
    return db_os_user() or pwd.getpwuid(os.geteuid()).pw_name


def init_cluster(config: ServerConfig) -> bool:
    """Create the cluster in ``config.pgdata`` unless it exists; True when it was created."""
    pgdata = config.pgdata
    if (pgdata / "PG_VERSION").is_file():
        return False
    if pgdata.exists() and any(pgdata.iterdir()):
        raise TeamServerError(f"{pgdata} is not empty and holds no PostgreSQL cluster (no PG_VERSION)")
    pgdata.mkdir(parents=True, exist_ok=True)
    user = db_os_user()
    if user:
        entry = pwd.getpwnam(user)
        os.chown(pgdata, entry.pw_uid, entry.pw_gid)
    pgdata.chmod(0o700)
    # The database user must reach pgdata through every parent folder; say which one blocks it
    # rather than letting initdb fail with a bare "permission denied".
    if user:
        probe = subprocess.run(_as_db_user(["test", "-w", str(pgdata)]), capture_output=True)
        if probe.returncode != 0:
            blocked = next((p for p in reversed(pgdata.parents) if not (p.stat().st_mode & 0o001)), pgdata.parent)
            raise TeamServerError(
                f"the database user {user!r} cannot reach {pgdata}: {blocked} is not searchable by other users "
                f"(chmod o+x {blocked}, or choose a pgdata outside it)")
    _run(_as_db_user([str(pg_bin_dir() / "initdb"), "-D", str(pgdata), "-U", _superuser(), "-E", "UTF8",
                      "--locale=C", "--auth-local=peer", "--auth-host=scram-sha-256"]),
         f"initdb -D {pgdata}")
    return True


def postgres_running(config: ServerConfig) -> bool:
    if not (config.pgdata / "PG_VERSION").is_file():
        return False
    done = subprocess.run(_as_db_user([str(pg_bin_dir() / "pg_ctl"), "status", "-D", str(config.pgdata)]),
                          capture_output=True, text=True)
    return done.returncode == 0


def start_postgres(config: ServerConfig, timeout: float = 60) -> None:
    """Start the cluster listening on ``db_host:db_port`` (a no-op when it already runs)."""
    if postgres_running(config):
        return
    options = (f"-c listen_addresses='{config.db_host}' -p {config.db_port} "
               f"-c unix_socket_directories='{socket_dir(config)}'")
    try:
        _run(_as_db_user([str(pg_bin_dir() / "pg_ctl"), "start", "-D", str(config.pgdata), "-w", "-t",
                          str(int(timeout)), "-l", str(config.postgres_log), "-o", options]),
             f"pg_ctl start -D {config.pgdata}", timeout=timeout + 10)
    except TeamServerError as exc:
        raise TeamServerError(f"{exc}\n{_tail(config.postgres_log)}") from exc


def stop_postgres(config: ServerConfig, timeout: float = 60) -> bool:
    """Stop the cluster (fast shutdown: open sessions are ended); True when one was running."""
    if not postgres_running(config):
        return False
    _run(_as_db_user([str(pg_bin_dir() / "pg_ctl"), "stop", "-D", str(config.pgdata), "-m", "fast", "-w", "-t",
                      str(int(timeout))]), f"pg_ctl stop -D {config.pgdata}", timeout=timeout + 10)
    return True


def _psql(config: ServerConfig, sql: str, database: str = "postgres") -> str:
    # SQL goes in on stdin so that the role's password never shows in a process list.
    return _run(_as_db_user([str(pg_bin_dir() / "psql"), "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1",
                             "-h", str(socket_dir(config)), "-p", str(config.db_port), "-U", _superuser(),
                             "-d", database]), "psql", input_text=sql)


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def db_password(config: ServerConfig) -> str:
    """The MLflow role's password: read from ``home/db-password``, created there (mode 600) once."""
    path = config.password_file
    if path.is_file():
        return path.read_text().strip()
    password = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(password + "\n")
    return password


def ensure_database(config: ServerConfig) -> None:
    """Create the role and database MLflow uses if missing; (re)set the role's password from
    ``home/db-password`` so the file is always the truth."""
    password = db_password(config)
    role_exists = _psql(config, f"SELECT 1 FROM pg_roles WHERE rolname = {_sql_literal(DB_ROLE)};").strip() == "1"
    verb = "ALTER" if role_exists else "CREATE"
    _psql(config, f"{verb} ROLE {DB_ROLE} WITH LOGIN PASSWORD {_sql_literal(password)};")
    db_exists = _psql(config, f"SELECT 1 FROM pg_database WHERE datname = {_sql_literal(DB_NAME)};").strip() == "1"
    if not db_exists:
        _psql(config, f"CREATE DATABASE {DB_NAME} OWNER {DB_ROLE} ENCODING 'UTF8';")


def backend_store_uri(config: ServerConfig) -> str:
    """The SQLAlchemy URI the MLflow server (only it) connects with; holds the password.

    The driver is named: SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3, while the
    ``server`` extra installs psycopg2."""
    host = "127.0.0.1" if config.db_host in ("0.0.0.0", "*", "::", "") else config.db_host.split(",")[0]
    password = urllib.parse.quote(db_password(config), safe="")
    return f"postgresql+psycopg2://{DB_ROLE}:{password}@{host}:{config.db_port}/{DB_NAME}"


# --------------------------------------------------------------------------------------------
# MLflow server
# --------------------------------------------------------------------------------------------

def _read_pid(config: ServerConfig) -> int | None:
    try:
        pid = int(config.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    # A recycled pid belongs to some other program: never signal it.
    return pid if "mlflow" in cmdline and "server" in cmdline else None


def healthy(url: str, timeout: float = 2) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start_mlflow(config: ServerConfig, timeout: float = 180) -> int:
    """Start ``mlflow server`` detached (own process group) and wait for ``/health``; its pid."""
    pid = _read_pid(config)
    if pid is not None and healthy(config.url):
        return pid
    if _port_in_use(config.host if config.host not in ("0.0.0.0", "::") else "127.0.0.1", config.port):
        raise TeamServerError(f"port {config.port} on {config.host} is already in use (choose another with --port)")
    config.artifacts.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # Through the environment, not argv: the URI carries the database password.
    env["MLFLOW_BACKEND_STORE_URI"] = backend_store_uri(config)
    # Job execution serves GenAI scorers, which skinml does not use; off, it spares a process.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "mlflow", "server", "--serve-artifacts",
               "--artifacts-destination", str(config.artifacts), "--host", config.host, "--port", str(config.port),
               "--workers", str(config.workers), *config.extra_server_args]
    with open(config.server_log, "ab") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=config.home, start_new_session=True)
    config.pid_file.write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TeamServerError(f"mlflow server exited with code {proc.returncode} before becoming healthy; "
                                  f"{config.server_log}:\n{_tail(config.server_log)}")
        if healthy(config.url):
            return proc.pid
        time.sleep(0.5)
    _kill_group(proc.pid)
    raise TeamServerError(f"mlflow server was not healthy at {config.url}/health within {timeout:.0f} s; "
                          f"{config.server_log}:\n{_tail(config.server_log)}")


def _kill_group(pid: int, grace: float = 20) -> None:
    """SIGTERM the server's process group (it and its uvicorn workers), SIGKILL after ``grace``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            break
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.2)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def stop_mlflow(config: ServerConfig) -> bool:
    pid = _read_pid(config)
    config.pid_file.unlink(missing_ok=True)
    if pid is None:
        return False
    _kill_group(pid)
    return True


# --------------------------------------------------------------------------------------------
# The whole server
# --------------------------------------------------------------------------------------------

def start(config: ServerConfig, timeout: float = 180) -> ServerConfig:
    """Create what is missing (cluster, role, database, folders), start PostgreSQL, then the
    MLflow server; returns once ``/health`` answers. Safe to call again on a running server."""
    config.home.mkdir(parents=True, exist_ok=True)
    if db_os_user():
        # The database user only needs to pass through home to reach pgdata inside it.
        config.home.chmod(config.home.stat().st_mode | 0o001)
    init_cluster(config)
    start_postgres(config)
    try:
        ensure_database(config)
        config.save()
        start_mlflow(config, timeout=timeout)
    except BaseException:
        stop_postgres(config)
        raise
    return config


def stop(config: ServerConfig) -> dict[str, bool]:
    """Stop the MLflow server, then PostgreSQL; says which of them was running."""
    return {"mlflow": stop_mlflow(config), "postgres": stop_postgres(config)}


def status(config: ServerConfig) -> dict[str, object]:
    return {
        "url": config.url,
        "mlflow_pid": _read_pid(config),
        "mlflow_healthy": healthy(config.url),
        "postgres_running": postgres_running(config),
        "db_port": config.db_port,
        "pgdata": str(config.pgdata),
        "artifacts": str(config.artifacts),
    }


@contextlib.contextmanager
def running(config: ServerConfig, timeout: float = 180) -> Iterator[ServerConfig]:
    """A started team server, stopped on exit (tests, one-off jobs)."""
    start(config, timeout=timeout)
    try:
        yield config
    finally:
        stop(config)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} could not be read)"
