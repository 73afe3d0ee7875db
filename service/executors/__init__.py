"""Executors run queued jobs; the API only enqueues.

``local`` spawns worker processes on this machine; ``ray`` runs each job as a Ray task on a Ray
cluster (imported only when chosen, so Ray is needed only where it is used).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..settings import Settings
    from ..store import JobStore


class Executor(Protocol):
    def start(self) -> None:
        """Begin claiming and running queued jobs in the background."""

    def notify(self) -> None:
        """A job was queued: look at the queue now rather than at the next poll."""

    def stop(self) -> None:
        """Stop claiming; stop running workers and hand their jobs back to the queue."""


def make_executor(settings: Settings, store: JobStore) -> Executor | None:
    if settings.executor == "none":
        return None
    if settings.executor == "local":
        from .local import LocalExecutor

        return LocalExecutor(settings, store)
    if settings.executor == "ray":
        try:
            from .ray import RayExecutor
        except ImportError as exc:
            raise RuntimeError(f"The 'ray' executor needs Ray on this machine ({exc}). Install it with "
                               "`pip install 'ray[default]'`, or choose the executor 'local'.") from exc
        return RayExecutor(settings, store)
    raise ValueError(f"Unknown executor {settings.executor!r}; valid: 'local', 'ray', 'none'.")


__all__ = ["Executor", "make_executor"]
