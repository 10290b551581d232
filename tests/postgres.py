"""A private PostgreSQL server for the tests: Debian's binaries, a cluster in a temporary directory, started
once per session (tests/conftest.py: `postgres_server`, `postgres_url`).

    server = PostgresServer.start()       # initdb + pg_ctl start: fsync off, 127.0.0.1 on a free port
    url = server.new_database()           # CREATE DATABASE t_<n> TEMPLATE ks_template (migrated once)
    server.kill(); server.start_again()   # pg_ctl stop -m immediate (a crash), then up on the same port

initdb refuses to run as root: as root the cluster belongs to the `postgres` user (`runuser`), in a directory
of its own under /tmp (pytest's own temporary directories are closed to other users). Clients connect over
TCP with trust authentication, which a server that only listens on loopback and lives for one session allows.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg
import pytest

from kleinserve.jobs.postgres import PostgresJobStore

SUPERUSER = "postgres"
TEMPLATE = "ks_template"  # migrated once; every test's database is a copy
START_TIMEOUT_S = 30


def _bin_dir() -> Path:
    """The newest installed PostgreSQL's bin directory; fails (not skips) the test when there is none."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not found:
        pytest.fail("PostgreSQL is not installed: run `make postgres-setup` (Debian's postgresql package)")
    return Path(found[-1]).parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostgresServer:
    """One cluster in `root` (data/, log, socket), listening on 127.0.0.1:`port`."""

    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self._bin = _bin_dir()
        self._databases = itertools.count()

    @classmethod
    def start(cls) -> PostgresServer:
        root = Path(tempfile.mkdtemp(prefix="kleinserve-pg-"))
        server = cls(root, _free_port())
        if os.geteuid() == 0:
            shutil.chown(root, SUPERUSER)
        server._run(
            "initdb", "-D", str(root / "data"), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--no-sync"
        )
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(server.port),
            "unix_socket_directories": f"'{root}'",
            # Fast commits that still survive the server's crash (`kill`), not the machine's: the WAL reaches
            # the OS at every commit (synchronous_commit stays on, or a crash loses acknowledged commits).
            "fsync": "off",
            "full_page_writes": "off",
            "max_connections": "200",  # concurrency tests open several pools at once
        }
        with (root / "data" / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
        server.start_again()
        with psycopg.connect(server.url("postgres"), autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {TEMPLATE}")
        PostgresJobStore(server.url(TEMPLATE), min_size=0, max_size=1).close()  # applies every migration
        return server

    def url(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def new_database(self, template: str = TEMPLATE) -> str:
        """The URL of a new database, a copy of `template`: the migrated one, or "template0" (empty)."""
        name = f"t_{next(self._databases)}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name} TEMPLATE {template} STRATEGY FILE_COPY")
        return self.url(name)

    def kill(self) -> None:
        """Stop as a crash would (`pg_ctl stop -m immediate`): connections drop, nothing is shut down."""
        self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop")

    def start_again(self) -> None:
        """Start (again) on the same port; returns once it accepts connections."""
        data, log = str(self.root / "data"), str(self.root / "log")
        self._run("pg_ctl", "-D", data, "-l", log, "-w", "-t", str(START_TIMEOUT_S), "start")

    def stop(self) -> None:
        """Stop and delete the cluster."""
        try:
            self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def _run(self, program: str, *args: str) -> None:
        command = [str(self._bin / program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", SUPERUSER, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            log = (self.root / "log").read_text()[-2000:] if (self.root / "log").exists() else ""
            raise RuntimeError(f"{program} failed ({done.returncode}): {done.stdout}{done.stderr}{log}")
