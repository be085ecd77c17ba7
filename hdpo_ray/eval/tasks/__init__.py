"""The evaluation tasks by name; each module reads its official layout and scores completions."""

from __future__ import annotations

from importlib import import_module

from hdpo_ray.config import EVAL_TASKS
from hdpo_ray.eval.tasks.base import Problem, Score, Task, TaskDataError

_MODULES = {
    "gsm8k": "gsm8k:GSM8K",
    "humaneval": "humaneval:HumanEval",
    "ifeval": "ifeval:IFEval",
    "mmlu_pro": "mmlu_pro:MMLUPro",
}
assert tuple(_MODULES) == EVAL_TASKS, "a task in the config must have a module here"
TASK_NAMES = EVAL_TASKS


def get_task_class(name: str) -> type[Task]:
    """The task class called `name` (one of TASK_NAMES); its module is imported only when asked for."""
    module, _, cls = _MODULES[name].partition(":")
    return getattr(import_module(f"hdpo_ray.eval.tasks.{module}"), cls)


def get_task(name: str, **options) -> Task:
    """The task called `name`, built with `options` (HumanEval's sandbox limits)."""
    return get_task_class(name)(**options)


__all__ = ["TASK_NAMES", "Problem", "Score", "Task", "TaskDataError", "get_task", "get_task_class"]
