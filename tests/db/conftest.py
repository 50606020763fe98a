"""Fixtures for the tuning-database tests: one conformance suite, three engines (SQLite in
memory, an SQLite file, a real PostgreSQL server on loopback)."""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from boundflow.ir.workload import Workload
from boundflow.planner import plan, space
from tests.helpers import example_graph

ROOT = Path(__file__).resolve().parents[2]
_ids = itertools.count()


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """The URL of a PostgreSQL server: ``$BOUNDFLOW_TEST_POSTGRES`` (``.ci/run`` starts one),
    else one started here with ``tools/pg_server.py``; a clear skip when neither works."""
    url = os.environ.get("BOUNDFLOW_TEST_POSTGRES")
    if url:
        yield url
        return
    root = Path("/tmp") / f"boundflow-pg-{os.getpid()}"
    got = subprocess.run([sys.executable, str(ROOT / "tools" / "pg_server.py"), "start",
                          str(root)], capture_output=True, text=True)
    if got.returncode != 0:
        pytest.skip(f"PostgreSQL tests skipped: no $BOUNDFLOW_TEST_POSTGRES and no server could "
                    f"be started here ({(got.stderr or got.stdout).strip()[-300:]})")
    yield got.stdout.strip()
    subprocess.run([sys.executable, str(ROOT / "tools" / "pg_server.py"), "stop", str(root)],
                   capture_output=True)


def fresh_postgres_database(server_url: str) -> str:
    """A new empty database on the server: its URL."""
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(server_url)
    name = f"bf_test_{os.getpid()}_{next(_ids)}"
    with psycopg.connect(host=u.host, port=u.port, user=u.username, dbname=u.database,
                         autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return u.set(database=name).render_as_string(hide_password=False)


@pytest.fixture(params=["sqlite-memory", "sqlite-file", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite-memory":
        return ":memory:"
    if request.param == "sqlite-file":
        return str(tmp_path / "tuning.db")
    return fresh_postgres_database(request.getfixturevalue("postgres_server"))


@pytest.fixture(params=["sqlite-file", "postgresql"])
def shared_db_url(request, tmp_path):
    """A database several processes can open."""
    if request.param == "sqlite-file":
        return str(tmp_path / "tuning.db")
    return fresh_postgres_database(request.getfixturevalue("postgres_server"))


def sample_bundles(n: int, seed: int = 0, name: str = "digits_mlp", method: str = "crown"):
    """``n`` distinct plans of one small workload, and the graph."""
    _, g = example_graph(name)
    w = Workload.of(g, batch=2, method=method)
    sp, rng = space(g, w), random.Random(seed)
    out, seen = [], set()
    for _ in range(50 * n):
        b = plan(g, w, sp.sample(rng))
        if b.key not in seen:
            seen.add(b.key)
            out.append(b)
        if len(out) == n:
            break
    assert len(out) == n, "the space is too small for that many distinct plans"
    return out, g
