"""``python -m service.migrations {upgrade,current,check,revision}``: manage the job store's schema by hand.

The database is ``--database-url`` or, without it, the one the service's settings name
(``CERTIPRUNE_DATABASE_URL``, else SQLite under ``CERTIPRUNE_DATA_DIR``).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.migrations", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["upgrade", "current", "check", "revision"])
    parser.add_argument("--database-url", help="SQLAlchemy URL (default: from CERTIPRUNE_* settings)")
    parser.add_argument("-m", "--message", help="revision: what the new revision changes")
    args = parser.parse_args(argv)

    from alembic import command

    from ..store import make_engine
    from . import alembic_config, current_revision, head_revision, schema_diff, upgrade

    url = args.database_url
    if url is None:
        from ..settings import Settings

        url = Settings().resolved_database_url
    engine = make_engine(url)
    try:
        if args.command == "upgrade":
            upgrade(engine)
            print(f"at {current_revision(engine)} (head {head_revision()})")
        elif args.command == "current":
            print(current_revision(engine) or "empty (no revision)")
        elif args.command == "check":
            with engine.connect() as conn:
                diff = schema_diff(conn)
            at_head = current_revision(engine) == head_revision()
            for item in diff:
                print(f"differs from the models: {item}")
            if not at_head:
                print(f"not at the head revision {head_revision()}")
            return 0 if at_head and not diff else 1
        else:
            if not args.message:
                parser.error("revision needs -m MESSAGE")
            upgrade(engine)  # autogenerate compares against a database at the head
            with engine.begin() as conn:
                command.revision(alembic_config(conn), message=args.message, autogenerate=True)
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
