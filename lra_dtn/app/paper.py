"""The LRA paper's numbers, the reference rows of the tables."""
from __future__ import annotations

# LRA README "as of 8th November 2020" = paper Table 1 (spec §10.1), test accuracy in %.
# None = FAIL (Path-X). The paper's Avg is over the 5 tasks without Path-X.
LRA_TASK_NAMES = {"listops": "ListOps", "text": "Text", "retrieval": "Retrieval", "image": "Image",
                  "pathfinder": "Path", "pathx": "Path-X"}
OFFICIAL_LRA: dict[str, dict[str, float | None]] = {
    "transformer": {"listops": 36.37, "text": 64.27, "retrieval": 57.46, "image": 42.44, "pathfinder": 71.40,
                    "pathx": None},
    "bigbird": {"listops": 36.05, "text": 64.02, "retrieval": 59.29, "image": 40.83, "pathfinder": 74.87,
                "pathx": None},
    "reformer": {"listops": 37.27, "text": 56.10, "retrieval": 53.40, "image": 38.07, "pathfinder": 68.50,
                 "pathx": None},
}
OFFICIAL_AVG = {"transformer": 54.39, "bigbird": 55.01, "reformer": 50.67}
# Not in any Avg, ours or the paper's: the paper averages its 5 tasks without Path-X (every model FAILs it).
NOT_AVERAGED = frozenset({"pathx"})
OFFICIAL_MODEL_NAMES = {"transformer": "Transformer", "bigbird": "BigBird", "reformer": "Reformer"}


def official(model: str, task: str) -> float | None:
    return OFFICIAL_LRA.get(model, {}).get(task)
