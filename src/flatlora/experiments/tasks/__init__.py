"""Task registry: `register_task` adds a factory, `create_task(name, model=..., **task_args)` builds a Task.

`list_tasks()` is what `flatlora tasks` prints, with whether each task can run here (its data fetched,
or a hub needed). Entries live in the project's `Registry` (a name registered twice raises). A new task
module registers its factories with `@register_task(...)` and is added with one import line at the end.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from ...registry import Registry
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
        return False, f"run: flatlora fetch {self.requires}"

    def options(self) -> dict[str, object]:
        sig = inspect.signature(self.factory)
        return {k: p.default for k, p in sig.parameters.items() if k != "model" and p.kind == p.KEYWORD_ONLY}


TASKS: Registry[TaskEntry] = Registry("task")


def register_task(name: str, help: str, default_model: str, requires: str | None = None):
    """Decorator: register `factory(*, model, **options) -> Task` under `name` (twice raises)."""

    def deco(factory):
        TASKS.add(name, TaskEntry(name, factory, help, default_model, requires))
        return factory

    return deco


def get_task_entry(name: str) -> TaskEntry:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS.names())} "
                         "(`flatlora tasks` describes them)")
    return TASKS.get(name)


def list_tasks() -> list[TaskEntry]:
    return [TASKS.get(n) for n in TASKS.names()]


def create_task(name: str, model: str | None = None, **task_args) -> Task:
    """Build task `name` with `model` (None = the task's default) and its options; checks the options first."""
    entry = get_task_entry(name)
    accepted = entry.options()
    unknown = sorted(set(task_args) - set(accepted))
    if unknown:
        raise ValueError(f"task {name!r} has no option {unknown[0]!r}; its options: "
                         + ", ".join(f"{k} (default {v!r})" for k, v in accepted.items()))
    return entry.factory(model=model or entry.default_model, **task_args)


# Task modules register on import, one line each.
from . import text  # noqa: E402,F401
from . import image  # noqa: E402,F401
from . import gsm  # noqa: E402,F401
from . import code_feedback  # noqa: E402,F401
from . import reasoning  # noqa: E402,F401
