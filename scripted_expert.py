"""scripted_expert.py — a goal-driven scripted expert for LIBERO, from privileged simulator state.

The project's offline source of demonstrations (no human data is downloaded): ``collect.py --policy scripted``
rolls it out and keeps the successes. The BDDL goal, a conjunction of atoms, becomes an ordered list of primitives:

* ``(On X Y)``, ``(In X region)``: pick and place with a top-down grasp (:class:`PickPlace`);
* ``(Open drawer)``, ``(Close drawer)``: grasp the handle from the front and slide the drawer along its joint
  (:class:`Drawer`);
* ``(Turnon stove)``, ``(Turnoff stove)``: grasp the knob from above and turn the wrist about its hinge
  (:class:`Knob`);
* ``(Close microwave)``: push its door round the hinge (:class:`Door`).

Atoms that already hold are skipped. A primitive ends with LIBERO's own predicate for its atom (observed as
``obs["goal_atoms"]``); one that does not hold is attempted again, at most ``MAX_ATTEMPTS`` times. Atoms are ordered
so that a drawer is opened before something is put into it, closed after, and an object is moved before another is
stacked on it. Joint state (kind, axis, anchor, range, LIBERO's thresholds, the moving body's parts) is read from
the simulator by libero_env (``obs["articulation"]``), not written down per scene. Which tasks this solves is
measured, not assumed: docs/scripted_expert_table.md (``bash scripts/scripted_expert_table.sh``). This file is
the planner (goals, order, retries, the rollout policy); the motions are expert_primitives.py (the shared base and
the joints) and expert_pick_place.py.

    python collect.py --policy scripted --suite libero_goal --task-id 7 --num-success 5 --obs-mode state
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

import libero_env as le
from expert_pick_place import PickPlace, Push
from expert_primitives import Atom, Door, Drawer, Knob, Primitive

MAX_ATTEMPTS = 3  # per atom, the first one included
SETTLE_STEPS = 10  # after a primitive, steps its atom may take to hold before the attempt counts as failed
TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs", "scripted_expert_table.md")
LISTED_RATE = 0.8  # --list-scripted-tasks: tasks measured at >= 80 % over the 50 init states


class UnsupportedTask(ValueError):
    """The scripted expert has no primitive for some atom of this task's goal."""


# ================================================================================================================
# Goals: parsing, primitives per atom, order
@dataclass(frozen=True)
class Step:
    index: int  # position of the atom in the BDDL goal (= in obs["goal_atoms"]); -1: a precondition the goal omits
    atom: Atom
    primitive: str  # "pick_place", "drawer" or "knob"

    def holds(self, obs: dict) -> bool:
        """LIBERO's predicate for a goal atom; for a precondition (an unlisted drawer opening) the same test on the
        joint (past the end of LIBERO's open range nearest to closed)."""
        if self.index >= 0:
            return bool(obs["goal_atoms"][self.index])
        return drawer_is_open(obs["articulation"][self.atom.args[0]])


def drawer_is_open(info: dict) -> bool:
    open_q, close_q = np.mean(info["ranges"]["open"]), np.mean(info["ranges"]["close"])
    threshold = min(info["ranges"]["open"], key=lambda q: abs(q - close_q))
    return (info["qpos"] - threshold) * np.sign(open_q - close_q) >= 0


def _bddl_regions(text: str) -> dict[str, str]:
    """Site name ``<target>_<region>`` -> the fixture/object the region belongs to."""
    block = text[text.index("(:regions") : text.index("(:fixtures")] if "(:regions" in text else ""
    return {f"{target}_{name}": target for name, target in re.findall(r"\(\s*([\w]+)\s*\(:target\s+([\w]+)\)", block)}


def _bddl_types(text: str) -> dict[str, str]:
    """Object/fixture name -> its type, from the :fixtures and :objects blocks."""
    types = {}
    for block in re.findall(r"\(:(?:fixtures|objects)(.*?)\)", text, re.S):
        for line in block.strip().splitlines():
            if " - " in line:
                names, kind = line.split(" - ")
                types.update({n: kind.strip() for n in names.split()})
    return types


def parse_goal(task: le.Task) -> tuple[list[Atom], dict[str, str], dict[str, str]]:
    """The goal atoms in BDDL order (LIBERO's ``goal_state`` order), the object types and the region owners."""
    with open(task.bddl_file) as f:
        text = f.read()
    goal_text = " ".join(text[text.index("(:goal") :].split())
    atoms = [Atom(p.lower(), tuple(a.split())) for p, a in re.findall(r"\((\w+)((?:\s+[\w]+)+)\)", goal_text)]
    return [a for a in atoms if a.predicate != "and"], _bddl_types(text), _bddl_regions(text)


def primitive_for(atom: Atom, types: dict, regions: dict) -> str:
    """The primitive that achieves ``atom``, or :class:`UnsupportedTask` saying why there is none."""
    pred, args = atom.predicate, atom.args
    owner_type = types.get(regions.get(args[-1], args[-1]), "")
    if pred in ("on", "in") and len(args) == 2:
        target = args[1]
        if pred == "in" and target.endswith("_contain_region"):  # basket, tray, caddy compartments
            return "pick_place"
        if pred == "on" and (target in types or target.endswith(("_top_side", "_cook_region"))):
            return "pick_place"
        if pred == "on" and owner_type.endswith("table"):  # a table region
            return "pick_place"
        if pred == "in" and owner_type.endswith("cabinet"):  # a drawer, opened first if the goal does not say so
            return "pick_place"
        raise UnsupportedTask(f"{atom}: a place it cannot reach from above ({owner_type or target})")
    if pred in ("open", "close") and owner_type.endswith("cabinet"):
        return "drawer"
    if pred in ("turnon", "turnoff") and owner_type.endswith("stove"):
        return "knob"
    if pred == "close" and owner_type.endswith("microwave"):
        return "door"
    if pred == "open" and owner_type.endswith("microwave"):
        raise UnsupportedTask(f"{atom}: swinging a hinged door open (by its handle) is not implemented")
    raise UnsupportedTask(f"{atom}: no primitive for {pred} on a {owner_type or args[-1]}")


def order_atoms(atoms: list[Atom], regions: dict) -> list[int]:
    """Indices of ``atoms`` in execution order: BDDL order, except that a drawer opens before something goes into
    it and closes after, and an object is moved before another one is put on or into it (stable topological)."""

    def owner(name: str) -> str:
        return regions.get(name, name)

    def before(a: Atom, b: Atom) -> bool:
        if a.predicate == "open" and b.predicate in ("on", "in") and b.args[1] == a.args[0]:
            return True
        if a.predicate in ("on", "in") and b.predicate == "close" and b.args[0] in (a.args[1], owner(a.args[1])):
            return True
        moved = a.args[0] if a.predicate in ("on", "in") else None
        return b.predicate in ("on", "in") and moved is not None and moved in (b.args[1], owner(b.args[1]))

    order, left = [], list(range(len(atoms)))
    while left:
        free = [i for i in left if not any(before(atoms[j], atoms[i]) for j in left if j != i)]
        pick = free[0] if free else left[0]  # a cycle cannot come from a consistent goal; keep BDDL order then
        order.append(pick)
        left.remove(pick)
    return order


def plan(task: le.Task) -> list[Step]:
    """The task's goal as ordered primitive steps; :class:`UnsupportedTask` (one sentence) if any atom has none."""
    atoms, types, regions = parse_goal(task)
    steps = []
    for i in order_atoms(atoms, regions):
        try:
            step = Step(i, atoms[i], primitive_for(atoms[i], types, regions))
        except UnsupportedTask as e:
            raise UnsupportedTask(
                f"The scripted expert cannot do task '{task.name}': {e}. "
                "Run `python collect.py --list-scripted-tasks` for the measured tasks."
            ) from None
        region = step.atom.args[-1]
        into_drawer = step.atom.predicate == "in" and types.get(regions.get(region, ""), "").endswith("cabinet")
        if into_drawer and Atom("open", (region,)) not in atoms:  # "put the bowl in the drawer" with it closed
            steps.append(Step(-1, Atom("open", (region,)), "drawer"))
        steps.append(step)
    return steps


def measured_table(path: str = TABLE) -> dict[tuple[str, int], tuple[int, int]]:
    """(suite, local id) -> (successes, episodes) from docs/scripted_expert_table.md."""
    out = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                m = re.match(r"\|\s*(libero_\w+)\s*\|\s*(\d+)\s*\|.*\|\s*(\d+)/(\d+)(?:\s*†)?\s*\|", line)
                if m:
                    out[m.group(1), int(m.group(2))] = (int(m.group(3)), int(m.group(4)))
    return out


def listed_tasks() -> list[le.Task]:
    """The tasks measured at >= LISTED_RATE (what ``--list-scripted-tasks`` prints and collect.py accepts)."""
    table = measured_table()
    ok = {k for k, (s, n) in table.items() if n and s / n >= LISTED_RATE}
    return [t for t in le.task_registry() if (t.suite, t.local_id) in ok]


# ================================================================================================================
# The planner
# ================================================================================================================
class ScriptedExpert:
    """One episode: the steps of :func:`plan` in order, skipping atoms that hold, each primitive checked with
    LIBERO's predicate when its motion ends and attempted again (at most MAX_ATTEMPTS times) if the atom does not
    hold. Records the noise-free action of every step (``labels``, the DART labels of noisy demos). ``placement``:
    how pick and place ends on top of another object (:class:`PickPlace`: "release" from 1 cm above, or "set-down"
    held)."""

    def __init__(self, steps: list[Step], scene: dict, noise: float = 0.0, rng=None, placement: str = "release"):
        self.steps, self.scene, self.noise, self.placement = steps, scene, noise, placement
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.current: Optional[Primitive] = None
        self.step: Optional[Step] = None
        self.attempts: dict[Step, int] = {}
        self.settle = 0
        self.labels: list[np.ndarray] = []
        self.log: list[tuple[str, str]] = []  # (atom, outcome) per attempt, for debugging and tests

    def make(self, step: Step, obs: dict) -> Primitive:
        if step.primitive == "pick_place":
            if PickPlace.pushes(step.atom, self.scene, obs["poses"]):
                return Push(step.atom, self.scene)
            return PickPlace(step.atom, self.scene, self.placement)
        return {"drawer": Drawer, "knob": Knob, "door": Door}[step.primitive](step.atom)

    def next_step(self, obs: dict) -> Optional[Step]:
        for step in self.steps:
            if not step.holds(obs) and self.attempts.get(step, 0) < MAX_ATTEMPTS:
                return step
        return None

    def act(self, obs: dict) -> np.ndarray:
        if self.current is not None and self.current.finished:
            # the atom may take a moment to hold (an object settling into a basket): wait a little before a retry
            self.settle += 1
            if self.step.holds(obs) or self.settle > SETTLE_STEPS:
                self.log.append((str(self.step.atom), "holds" if self.step.holds(obs) else "failed"))
                self.current, self.settle = None, 0
        if self.current is None:
            self.step = self.next_step(obs)
            if self.step is not None:
                self.attempts[self.step] = self.attempts.get(self.step, 0) + 1
                self.current = self.make(self.step, obs)
        if self.current is None or self.current.finished:  # settling; or all done / every attempt spent: stay still
            action = np.array([0, 0, 0, 0, 0, 0, -1.0])
        else:
            action = self.current.act(obs)
        self.labels.append(action.copy())
        if self.noise:
            action = action.copy()
            action[:6] = np.clip(action[:6] + self.rng.normal(0.0, self.noise, 6), -1.0, 1.0)
        return action


class ScriptedPolicy:
    """Rollout interface around one :class:`ScriptedExpert` per environment (closed loop, one action per query)."""

    replan_steps, image_size, needs_privileged = 1, None, True

    def __init__(self, steps: list[Step], scene: dict, noise: float, seed: int, placement: str = "release"):
        PickPlace.check_placement(placement)  # before any episode starts
        self.steps, self.scene, self.noise, self.seed, self.placement = steps, scene, noise, seed, placement
        self.experts: dict[int, ScriptedExpert] = {}
        self.by_episode: dict[int, ScriptedExpert] = {}

    def reset(self, env_ids, episodes) -> None:
        for i, e in zip(env_ids, episodes):
            rng = np.random.default_rng([self.seed, e])
            expert = ScriptedExpert(self.steps, self.scene, self.noise, rng, self.placement)
            self.experts[i] = self.by_episode[e] = expert

    def expert_labels(self, episode: int) -> np.ndarray:
        """The noise-free actions of an episode's steps (forgotten once read)."""
        return np.stack(self.by_episode.pop(episode).labels)

    def __call__(self, obs: dict, env_ids) -> np.ndarray:
        rows = []
        for j, i in enumerate(env_ids):
            single = {k: v[j] for k, v in obs.items()}
            rows.append(self.experts[i].act(single))
        return np.stack(rows)[:, None]  # (B, 1, 7)
