"""PostgreSQL fixtures, loaded from tests/conftest.py as a pytest plugin.

Which server (``select_server`` in tests/pgcluster.py):

1. ``KEYRING_HARDENED_TEST_PG_URL`` set: that server, through its superuser URL;
   every test gets a database of its own on it, dropped afterwards.
2. Else PostgreSQL's server binaries found (the highest
   /usr/lib/postgresql/*/bin, else ``initdb`` on PATH): a throwaway cluster.
3. Else, with ``CI=true``: the tests that need PostgreSQL fail, one line each.
   Elsewhere they skip, with a reason that says how to install it.

Under pytest-xdist each worker starts its own cluster, on its own socket
directory and port, when its first PostgreSQL test asks for one (about a
second). Nothing is shared between workers, so a test that restarts or
crashes its worker's server cannot break a test running on the other worker.
An external server is shared by all workers; they only ever create and drop
databases of their own names on it.

The environment is read when this plugin is imported, before the autouse
``_isolate`` fixture of tests/conftest.py clears ``KEYRING_HARDENED_*``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from .pgcluster import Cluster, PgServer, Selection, open_server, select_server

_ENV = {name: os.environ[name] for name in ("KEYRING_HARDENED_TEST_PG_URL", "CI")
        if name in os.environ}

_selection: Selection | None = None


def pg_selection() -> Selection:
    """The server choice for this process, made once."""
    global _selection
    if _selection is None:
        _selection = select_server(_ENV)
    return _selection


def pg_available() -> bool:
    """Whether PostgreSQL tests can run here (a server URL is set or binaries are found).

    For choosing what to parametrise or benchmark, not for skipping: a test
    that needs PostgreSQL should ask for ``pg_url`` or ``pg_cluster``, which
    fail rather than skip in CI.
    """
    return pg_selection().choice in ("external", "cluster")


def _require(selection: Selection) -> None:
    if selection.choice == "fail":
        pytest.fail(selection.detail, pytrace=False)
    if selection.choice == "skip":
        pytest.skip(selection.detail)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgServer]:
    """This worker's PostgreSQL server: a throwaway cluster, or the external server."""
    selection = pg_selection()
    _require(selection)
    server = open_server(selection)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def pg_managed_cluster(pg_cluster: PgServer) -> Cluster:
    """The throwaway cluster itself, for tests that restart it or read its log.

    Skips when the tests use an external server (``KEYRING_HARDENED_TEST_PG_URL``),
    which they may not restart and whose log they cannot read; CI never sets it.
    """
    if not isinstance(pg_cluster, Cluster):
        pytest.skip("needs a throwaway cluster: KEYRING_HARDENED_TEST_PG_URL names a server "
                    "that tests may not restart and whose log they cannot read")
    return pg_cluster


@pytest.fixture
def pg_url(pg_cluster: PgServer) -> Iterator[str]:
    """A fresh, empty database of its own for this test: a superuser URL."""
    url = pg_cluster.new_database()
    yield url
    if isinstance(pg_cluster, Cluster) and not pg_cluster.is_running():
        # The test stopped the server (a restart test that failed half-way):
        # start it again for the tests that follow on this worker.
        pg_cluster.start()
    pg_cluster.drop_database(url)
