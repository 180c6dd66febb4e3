"""Task registry: `register_task` adds a factory, `create_task(name, model=..., **task_args)` builds a Task.

`list_tasks()` is what `flatlora tasks` prints, with whether each task can run here (its data fetched,
or a hub needed).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from .base import Task


@dataclass
class TaskEntry:
    name: str
    factory: Callable[..., Task]
    help: str
    default_model: str
    requires: str | None = None  # a `fetch` item, "hub", or None (always available)

    def available(self) -> tuple[bool, str]:
        """(runnable here?, why / what to do)."""
        if self.requires is None:
            return True, "local"
        if self.requires == "hub":
            return False, "needs a hub (model and data download) and `pip install datasets`"
        from ..fetch import status

        if status().get(self.requires):
            return True, f"fetched ({self.requires})"
        return False, f"run: python -m flatlora.experiments.fetch {self.requires}"

    def options(self) -> dict[str, object]:
        sig = inspect.signature(self.factory)
        return {k: p.default for k, p in sig.parameters.items() if k != "model" and p.kind == p.KEYWORD_ONLY}


_TASKS: dict[str, TaskEntry] = {}


def register_task(name: str, help: str, default_model: str, requires: str | None = None):
    """Decorator: register `factory(*, model, **options) -> Task` under `name` (twice raises)."""

    def deco(factory):
        if name in _TASKS:
            raise ValueError(f"task {name!r} is already registered")
        _TASKS[name] = TaskEntry(name, factory, help, default_model, requires)
        return factory

    return deco


def get_task_entry(name: str) -> TaskEntry:
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(_TASKS)} (`flatlora tasks` describes them)")
    return _TASKS[name]


def list_tasks() -> list[TaskEntry]:
    return list(_TASKS.values())


def create_task(name: str, model: str | None = None, **task_args) -> Task:
    """Build task `name` with `model` (None = the task's default) and its options; checks the options first."""
    entry = get_task_entry(name)
    accepted = entry.options()
    unknown = sorted(set(task_args) - set(accepted))
    if unknown:
        raise ValueError(f"task {name!r} has no option {unknown[0]!r}; its options: "
                         + ", ".join(f"{k} (default {v!r})" for k, v in accepted.items()))
    return entry.factory(model=model or entry.default_model, **task_args)


from . import text, image, gsm, humaneval  # noqa: E402,F401  (registration)
from . import reasoning  # noqa: E402,F401  (registration: reasoning-arith)
