"""Schema migrations of the job store (Alembic), configured in code so that an installed package migrates itself.

``upgrade(engine)`` brings a database to the newest revision. Every process that opens a store
calls it (the API, ``certiprune worker``, each job's worker process); when the schema is already
current that costs one query. Concurrent upgraders are serialised: on PostgreSQL by a
transaction-scoped advisory lock, on SQLite by a lock file next to the database. A database made
before migrations existed (tables, no ``alembic_version``) is adopted: missing tables, columns and
indexes are added, then it is stamped at the head revision.

By hand: ``python -m service.migrations upgrade [--database-url URL]`` (also ``current``, ``check``,
and ``revision -m MESSAGE`` to autogenerate a new revision from the models in ``service.tables``).
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, inspect, text

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger("certiprune.migrations")

HERE = Path(__file__).resolve().parent
#: The newest revision in versions/. Spelled out so that opening a current store needs no Alembic
#: import (every job's process opens one); a test checks it against Alembic's own view.
HEAD_REVISION = "0004"
#: One PostgreSQL advisory lock key for schema changes ("cert" in ASCII).
ADVISORY_LOCK_KEY = 0x63657274


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic configuration without an ini file; ``connection`` is handed to ``env.py``."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    return HEAD_REVISION


def script_head() -> str | None:
    """The head revision as Alembic finds it in versions/ (should equal ``HEAD_REVISION``)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The database's revision, None when it has none (plain SQL: this runs at every store opening)."""
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def schema_diff(connection: Connection) -> list[Any]:
    """Differences between the database behind ``connection`` and the models (empty when they match)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from ..tables import Base

    ctx = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(ctx, Base.metadata))


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision``; a no-op when it is already at the head."""
    if revision == "head" and current_revision(engine) == head_revision():
        return
    from alembic import command
    from alembic.migration import MigrationContext

    with _exclusive(engine) as conn:
        current = MigrationContext.configure(conn).get_current_revision()
        if current is not None and not _is_known(current):
            log.warning("The database schema is at revision %s, newer than this certiprune knows (%s); "
                        "leaving it as it is. Upgrade this process to the version that migrated it.",
                        current, script_head())
            return
        cfg = alembic_config(conn)
        if current is None and "jobs" in inspect(conn).get_table_names():
            _adopt_unversioned(conn)
            command.stamp(cfg, "head")
            log.info("adopted a database made before migrations existed; stamped at %s", script_head())
        else:
            command.upgrade(cfg, revision)
            log.info("database schema upgraded from %s to %s", current or "empty", revision)


def _is_known(revision: str) -> bool:
    from alembic.script import ScriptDirectory
    from alembic.util.exc import CommandError

    try:
        return ScriptDirectory.from_config(alembic_config()).get_revision(revision) is not None
    except CommandError:
        return False


@contextmanager
def _exclusive(engine: Engine) -> Iterator[Connection]:
    """A transaction that no other certiprune process is migrating the same database in."""
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
            yield conn
        return
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:":
        with engine.begin() as conn:
            yield conn
        return
    with open(f"{database}.migrate-lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        with engine.begin() as conn:
            yield conn


def _adopt_unversioned(conn: Connection) -> None:
    """Add what the models have and a pre-migration database lacks: tables, nullable columns, indexes."""
    from alembic.migration import MigrationContext
    from alembic.operations import Operations

    from ..tables import Base

    Base.metadata.create_all(conn)  # tables that are missing entirely, with their indexes
    inspector = inspect(conn)
    ops = Operations(MigrationContext.configure(conn))
    for table in Base.metadata.sorted_tables:
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            if not column.nullable and column.server_default is None:
                raise RuntimeError(f"Cannot adopt the database: table {table.name!r} lacks the required column "
                                   f"{column.name!r}. Migrate it by hand or start from an empty database.")
            ops.add_column(table.name, column._copy())
        indexes = {i["name"] for i in inspector.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in indexes:
                index.create(conn)
    leftover = schema_diff(conn)
    if leftover:
        log.warning("the adopted database still differs from the models: %s", leftover)


__all__ = ["HEAD_REVISION", "alembic_config", "current_revision", "head_revision", "schema_diff", "script_head",
           "upgrade"]
