"""``python -m service.cli`` is the ``certiprune`` command."""

from . import main

if __name__ == "__main__":
    raise SystemExit(main())
