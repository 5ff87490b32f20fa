"""libero_tasks.py — the benchmark as data: LIBERO's 130 tasks, their protocol constants and fixed init states.

* the task registry (130 tasks; global ids 0-129 in the order spatial, object, goal, libero_10, libero_90),
  with the instruction read from each BDDL file's ``:language`` (never parsed from the file name);
* the evaluation protocol's numbers (``SUITE_MAX_STEPS``, ``NUM_WAIT_STEPS``, ``WAIT_ACTION``, the 50 init states);
* the layout split's constants: the protocol's 50 fixed init states are held out for evaluation, training uses
  layouts LIBERO's placement initializer samples (:meth:`libero_env.LiberoEnv.reset`).

Nothing here builds a simulator: scripts validate ``--suite``/``--task-id`` with it before any work starts.
libero_env re-exports these names (``le.resolve_task``), so the phase scripts import one module for LIBERO.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np

# ----------------------------------------------------------------------------------------------------------------
# Protocol constants (OpenVLA / openpi LIBERO evaluation protocol)
# ----------------------------------------------------------------------------------------------------------------
SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
SUITE_SIZES = {"libero_spatial": 10, "libero_object": 10, "libero_goal": 10, "libero_10": 10, "libero_90": 90}
# Steps allowed after the wait steps. LeRobot's wrapper uses 280 for spatial; we follow OpenVLA/openpi (220).
INSTRUCTION_CONVENTIONS = ("bddl", "benchmark")  # see Task.prompt
SUITE_MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
NUM_WAIT_STEPS = 10  # objects settle after set_init_state; these steps do not count toward the limit
WAIT_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)  # hold still, gripper open
NUM_INIT_STATES = 50  # fixed init states per task; episode e uses init state e
# Layouts: the protocol's 50 fixed init states are held out for evaluation; training, demonstrations and collection
# use layouts LIBERO's own placement initializer samples (the BDDL regions) from the episode's seed.
LAYOUTS = ("protocol", "sampled")
SAMPLED = -1  # the ``init_state`` of a reset to a sampled layout (recorded as such in results and HDF5 files)
MIN_PROTOCOL_DISTANCE = 0.001  # m: a sampled layout whose every object lies this close to a protocol state is one
SETTLE_TOLERANCE = 0.01  # m: how much further than in any protocol state an object may slide while settling
MAX_LAYOUT_DRAWS = 100  # redraws allowed before a sampled reset gives up (none needed more than a few, measured)


class TaskError(ValueError):
    """A task selection the user can fix (unknown suite, task id out of range)."""


# ----------------------------------------------------------------------------------------------------------------
# Task registry
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    global_id: int  # 0-129 across the five suites
    suite: str
    local_id: int  # index within the suite (LIBERO's task order 0)
    name: str  # BDDL file stem; also the HDF5 file stem of LIBERO's demos
    instruction: str  # the BDDL ``:language`` text (what LIBERO's demo files and ours store)
    bddl_file: str
    max_steps: int  # protocol step limit after the wait steps
    language: str = ""  # LIBERO's ``task.language``, derived from the file name: OpenVLA's/openpi's prompt

    def prompt(self, convention: str) -> str:
        """The instruction text of a convention: ``bddl`` (the BDDL ``:language``) or ``benchmark`` (LIBERO's
        file-name-derived ``task.language``, which OpenVLA, openpi and LeRobot train and evaluate with)."""
        if convention not in INSTRUCTION_CONVENTIONS:
            raise ValueError(f"Unknown instruction convention '{convention}'; choose bddl or benchmark.")
        return self.instruction if convention == "bddl" else self.language


def bddl_language(path: str) -> str:
    """The task instruction: the ``(:language ...)`` clause of a BDDL file."""
    with open(path) as f:
        text = f.read()
    match = re.search(r"\(:language\s+([^)]*)\)", text)
    if match is None:
        raise ValueError(f"{path} has no (:language ...) clause; is it a LIBERO BDDL file?")
    return " ".join(match.group(1).split())


@lru_cache(maxsize=1)
def task_registry() -> tuple[Task, ...]:
    """All 130 tasks in global-id order."""
    from libero.libero import benchmark

    tasks = []
    for suite_name in SUITES:
        with contextlib.redirect_stdout(io.StringIO()):  # LIBERO-PRO prints its task order on construction
            suite = benchmark.get_benchmark_dict()[suite_name]()
        assert suite.n_tasks == SUITE_SIZES[suite_name], f"{suite_name}: expected {SUITE_SIZES[suite_name]} tasks"
        for local_id in range(suite.n_tasks):
            bddl = os.path.normpath(suite.get_task_bddl_file_path(local_id))
            tasks.append(
                Task(
                    global_id=len(tasks),
                    suite=suite_name,
                    local_id=local_id,
                    name=suite.get_task(local_id).name,
                    instruction=bddl_language(bddl),
                    bddl_file=bddl,
                    max_steps=SUITE_MAX_STEPS[suite_name],
                    language=suite.get_task(local_id).language,
                )
            )
    return tuple(tasks)


def check_task_args(suite: str, task_id: Optional[int]) -> None:
    """Validate --suite/--task-id without importing LIBERO (so scripts fail before any work starts)."""
    if suite != "all" and suite not in SUITES:
        raise TaskError(f"Unknown suite '{suite}'; choose one of: all, {', '.join(SUITES)}.")
    if task_id is None:
        return
    n = sum(SUITE_SIZES.values()) if suite == "all" else SUITE_SIZES[suite]
    if not 0 <= task_id < n:
        raise TaskError(
            f"Task id {task_id} is out of range for suite '{suite}' (valid: 0-{n - 1}); "
            "run `python libero_env.py --list-tasks` to see the ids."
        )


def resolve_task(suite: str, task_id: int) -> Task:
    """--suite all: task_id is the global id 0-129; a named suite: task_id indexes within it."""
    check_task_args(suite, task_id)
    if suite == "all":
        return task_registry()[task_id]
    return next(t for t in task_registry() if t.suite == suite and t.local_id == task_id)


def suite_tasks(suite: str) -> list[Task]:
    check_task_args(suite, None)
    return [t for t in task_registry() if suite == "all" or t.suite == suite]


def load_init_states(task: Task) -> np.ndarray:
    """The task's fixed initial simulator states, (50, D) float64."""
    from libero.libero import benchmark

    with contextlib.redirect_stdout(io.StringIO()):
        states = benchmark.get_benchmark_dict()[task.suite]().get_task_init_states(task.local_id)
    assert len(states) == NUM_INIT_STATES, f"{task.name}: expected {NUM_INIT_STATES} init states, got {len(states)}"
    return np.asarray(states, dtype=np.float64)


def task_dir_name(task: Task) -> str:
    """Run-directory component of DESIGN.md: ``task<NN>`` with the two-digit index within the suite."""
    return f"task{task.local_id:02d}"
