"""The LRA tasks, one module each, registered in :data:`TASKS` by name."""
from tasks.base import TASKS, DataOptions, Task
from tasks import listops, text, retrieval, image, pathfinder  # noqa: F401  (registers the tasks)

__all__ = ["TASKS", "DataOptions", "Task"]
