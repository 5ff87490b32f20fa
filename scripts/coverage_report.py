"""The coverage study's page (scripts/coverage.sh) -> docs/coverage.md, from the committed artefacts only.

    python scripts/coverage_report.py      # reads docs/coverage/{draw.json, tasks/, recipe-v1/, lift/, layouts/},
                                           # writes the page + curves

Per drawn task (docs/coverage/draw.json, in its order), what coverage.sh exported to docs/coverage/tasks/<task>/ (the
recipe now; the first recipe's runs are docs/coverage/recipe-v1/tasks/<task>/, the same files):
demos.json (the DART demonstrations on sampled layouts), args.json, metrics.jsonl and final_eval.json of the PPO run,
wall_s.txt and demos_wall_s.txt (wall time of PPO and of the demonstrations), sampled_eval.json (the final policy on
200 sampled layouts) and, below the gate, failures.json (scripts/failure_modes.py over the failed protocol episodes);
and docs/coverage/layouts/<task>.json (scripts/layout_spread.py). Success rates carry their binomial standard error
(convergence_report.rate); "env steps to X %" is the first in-run evaluation (50 protocol episodes) at or above X.
"""

import argparse
import json
import os
import sys
from collections import Counter

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import convergence_report as cr  # noqa: E402
import failure_modes as fm  # noqa: E402

import libero_env as le  # noqa: E402

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")  # --docs overrides
GATE = 0.95  # the goal: >= 95 % (>= 190 of 200 protocol episodes) in the evaluated mode
BUDGET = 1_500_000  # env steps
STRETCH = 750_000
LIFTED, ON_RADIUS = fm.LIFTED, fm.ON_RADIUS  # the thresholds the failure analysis measured with


def dir_name(spec: str) -> str:
    """``libero_10:3`` -> ``libero_10_task03``, the folder coverage.sh exports a task to."""
    suite, local = spec.split(":")
    return f"{suite}_task{int(local):02d}"


def load(root: str, name: str, spec: str) -> dict:
    path = os.path.join(root, "tasks", name)
    suite, local = spec.split(":")
    task = {"spec": spec, "name": name, "suite": suite, "task": le.resolve_task(suite, int(local)), "path": path}
    read = lambda f: json.load(open(os.path.join(path, f))) if os.path.exists(os.path.join(path, f)) else None  # noqa: E731
    task["demos"], task["sampled"], task["failures"] = read("demos.json"), read("sampled_eval.json"), read(
        "failures.json")  # fmt: skip
    task["bc_final"] = read("bc_start_final.json")  # the BC start on the final evaluation's episodes
    wall = os.path.join(path, "demos_wall_s.txt")
    task["demos_wall_s"] = sum(float(x) for x in open(wall).read().split()) if os.path.exists(wall) else None
    task["run"] = cr.load_run(path) if os.path.exists(os.path.join(path, "metrics.jsonl")) else None
    layouts = os.path.join(root, "layouts", f"{name}.json")
    task["layouts"] = json.load(open(layouts)) if os.path.exists(layouts) else None
    return task


def final_rate(task: dict):
    run = task["run"]
    if run is None or run["final"] is None:
        return None
    return run["final"][run["final"]["eval_mode"]]["success_rate"]


def first_reaching(run: dict, threshold: float):
    """(env steps, running seconds) of the first in-run evaluation at or above the threshold, else None."""
    return next(((s, t) for s, p, t in cr.evals(run) if p >= threshold), None)


def status(task: dict) -> str:
    run = task["run"]
    if run is None:  # a BC-only check (coverage.sh BC_ONLY=1), or a run whose metrics are exported when it ends
        if os.path.exists(os.path.join(task["path"], "bc_start_mean.json")):
            return "BC start only"
        return "demos only" if task["demos"] else "not started"
    if run["final"] is None:
        return f"not finished (iteration {run['rows'][-1].get('step', 0)} of {run['args']['num_iterations']})"
    p = final_rate(task)
    return f"**{'≥' if p >= GATE else '<'} 95 %**"


def task_rows(tasks: list[dict]) -> list[str]:
    head = ("| task | instruction | DART demos on sampled layouts (expert success) | BC start (mean / eta0, 50 ep.) | "
            + " | ".join(f"to {int(100 * t)} % (env steps, wall)" for t in cr.THRESHOLDS)
            + " | final, protocol (200 ep.): mean | sample | eta0 | sampled layouts (200 ep., mean) | env steps | "
            "wall (demos + PPO) | status |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for t in tasks:
        run, demos = t["run"], t["demos"]
        demo_cell = (f"{demos['num_demos']} of {demos['num_attempts']} ({100 * demos['success_rate']:.0f} %), "
                     f"{demos['mean_length']:.0f} steps" if demos else "–")  # fmt: skip
        if run is None:  # not run yet, or a BC-only check (its BC start measured as a run's iteration 0 is)
            lines.append(f"| {t['spec']} | {t['task'].instruction} | {demo_cell} | {bc_start(t)} | "
                         + " | ".join(["–"] * 9) + f" | {status(t)} |")  # fmt: skip
            continue
        reach = []
        for threshold in cr.THRESHOLDS:
            hit = first_reaching(run, threshold)
            reach.append(f"{hit[0] / 1e3:.0f}k, {hit[1] / 3600:.1f} h" if hit else "not reached")
        finals = cr.final_cells(run)[:3] if run["final"] else ["–"] * 3
        sampled = t["sampled"]
        sampled_cell = cr.rate(sampled["success_rate"], sampled["num_episodes"]) if sampled else "–"
        steps = run["final"]["env_steps"] if run["final"] else run["rows"][-1].get("env_steps", 0)
        wall = (t["demos_wall_s"] or 0) + (run["wall_s"] or 0)
        # final_cells orders sample, mean, eta0: the table puts the evaluated mode (mean) first
        lines.append(f"| {t['spec']} | {t['task'].instruction} | {demo_cell} | {cr.start_cells(run)} | "
                     + " | ".join(reach) + f" | {finals[1]} | {finals[0]} | {finals[2]} | {sampled_cell} | "
                     f"{steps / 1e3:.0f}k | {wall / 3600:.1f} h | {status(t)} |")  # fmt: skip
    return lines


def suite_rows(tasks: list[dict]) -> list[str]:
    lines = ["| suite | tasks finished | mean final success (protocol, mean mode) | tasks ≥ 95 % | sampled layouts |",
             "|---|---|---|---|---|"]  # fmt: skip
    for suite in le.SUITES:
        mine = [t for t in tasks if t["suite"] == suite]
        done = [t for t in mine if final_rate(t) is not None]
        rates = [final_rate(t) for t in done]
        sampled = [t["sampled"]["success_rate"] for t in done if t["sampled"]]
        lines.append(f"| {suite} | {len(done)} of {len(mine)} | "
                     + (f"{100 * np.mean(rates):.1f} %" if rates else "–") + f" | {sum(r >= GATE for r in rates)} | "
                     + (f"{100 * np.mean(sampled):.1f} %" if sampled else "–") + " |")  # fmt: skip
    return lines


def failure_lines(tasks: list[dict]) -> list[str]:
    """For every finished task below the gate, where its failed protocol episodes went (failure_modes.py)."""
    lines = []
    for t in tasks:
        p = final_rate(t)
        if p is None or p >= GATE:
            continue
        f = t["failures"]
        if f is None:
            lines.append(f"- **{t['spec']}** ({100 * p:.1f} %): failures not analysed yet.")
            continue
        eps = f["episodes"]
        never_closed = sum(e["gripper_closes"] == 0 for e in eps)
        not_lifted = sum(e["gripper_closes"] > 0 and e["max_lift_m"] < LIFTED for e in eps)
        lowered = sum(e["max_lift_m"] >= LIFTED and e["final_lift_m"] < LIFTED for e in eps)
        held = sum(e["final_lift_m"] >= LIFTED for e in eps)
        regrasp = sum(e["gripper_closes"] >= 3 for e in eps)
        states = sorted({e["init_state"] for e in eps})
        joint = bool(eps) and all("joint_max_progress" in e for e in eps)  # a goal on a fixture: nothing is lifted
        head = (f"- **{t['spec']}** ({100 * p:.1f} %, {len(eps)} failed episodes on {len(states)} of 50 init "
                f"states: {', '.join(map(str, states))}), {'fixture' if joint else 'object'} `{f['object']}`: "
                f"{never_closed} never closed the gripper; ")  # fmt: skip
        if joint:
            head += (f"{regrasp} closed it 3 or more times (re-grasp loops; median "
                     f"{np.median([e['gripper_closes'] for e in eps]):.0f} closes)")  # fmt: skip
        else:
            head += (f"{not_lifted} closed it but never lifted the object {100 * LIFTED:.0f} cm; {lowered} lifted it "
                     f"and ended less than {100 * LIFTED:.0f} cm above its start height, {held} {100 * LIFTED:.0f} cm "
                     f"or more above it; {regrasp} closed the gripper 3 or more times (re-grasp loops)")  # fmt: skip
        lines.append(head + f"; median length {np.median([e['length'] for e in eps]):.0f} steps"
                     + (f"; {sum(e['final_gripper_closed'] for e in eps)} ended with the gripper commanded closed."
                        if all("final_gripper_closed" in e for e in eps) else "."))  # fmt: skip
        if eps and all("final_target_xy_m" in e for e in eps):  # failure_modes.py measured the goal's target too
            over = [e for e in eps if e["final_target_xy_m"] < ON_RADIUS]
            cm = lambda v: f"{100 * v:.1f}"  # noqa: E731
            heights = [e["final_above_target_m"] for e in over]
            arrive = [e.get("first_over_target_step") for e in over]
            stay = [e.get("steps_over_target") for e in over]
            dz = [e.get("z_cmd_over_target_mean") for e in over]
            down = [e.get("z_cmd_over_target_down") for e in over]
            opens = [e.get("open_cmds_over_target") for e in over]
            part = (f" Against the target `{f['target']}`: {len(over)} ended with the object's centre within "
                    f"{100 * ON_RADIUS:.0f} cm (xy) of the target's (LIBERO's On radius between objects)")  # fmt: skip
            if over:
                part += f", {cm(min(heights))}-{cm(max(heights))} cm above it (median {cm(np.median(heights))})"
                if None not in arrive:
                    part += (f"; they got there at env step {min(arrive)}-{max(arrive)} and stayed over it "
                             f"{min(stay)}-{max(stay)} steps")  # fmt: skip
                if None not in dz:
                    part += (f", commanding z {min(dz):+.2f} to {max(dz):+.2f} on average there (down in "
                             f"{100 * min(down):.0f}-{100 * max(down):.0f} % of its steps)")  # fmt: skip
                if None not in opens:
                    part += f", and commanding the gripper open there in {min(opens)}-{max(opens)} of those steps"
            lines[-1] += part + f"; {sum(e['final_target_xy_m'] >= 0.10 for e in eps)} ended 10 cm or more from it."
        if joint:  # how far the fixture's joint got (open a drawer, turn on a stove)
            best = [e["joint_max_progress"] for e in eps]
            end = [e["joint_final_progress"] for e in eps]
            moved = [e["joint_first_moved_step"] for e in eps if e["joint_first_moved_step"] is not None]
            lines[-1] += (f" Its joint, toward LIBERO's `{eps[0]['joint_predicate']}` threshold (fraction of the way "
                          f"from where it started): {sum(b < 0.1 for b in best)} never moved it 10 % of the way, "
                          f"{sum(0.1 <= b < 0.5 for b in best)} got 10-50 %, {sum(b >= 0.5 for b in best)} half way or "
                          f"further (at most {max(best):.2f}); at the end {np.median(end):.2f} of the way (median)"
                          + (f"; those that moved it first did at env step {min(moved)}-{max(moved)}." if moved
                             else "."))  # fmt: skip
        lines[-1] += goal_atoms_part(t, f) + bc_start_part(t)
    return lines or ["- none below 95 % among the finished tasks."]


def bc_start_part(task: dict) -> str:
    """The BC start on the final evaluation's own episodes (coverage.sh): whether PPO lifted or lowered it."""
    bc, final = task["bc_final"], task["run"]["final"]
    if bc is None:
        return ""
    mode = final["eval_mode"]
    ok_bc, ok_final = [e["success"] for e in bc["episodes"]], final[mode]["successes"]
    if len(ok_bc) != len(ok_final):
        return ""
    n = len(ok_final)
    lost = sum(b and not f for b, f in zip(ok_bc, ok_final))
    won = sum(f and not b for b, f in zip(ok_bc, ok_final))
    return (f" The BC start on the same {n} episodes (`{mode}`): {100 * np.mean(ok_bc):.1f} % ({sum(ok_bc)} of {n}); "
            f"PPO's final policy fails {lost} it succeeded in and succeeds in {won} it failed.")  # fmt: skip


def goal_atoms_part(task: dict, failures: dict) -> str:
    """Which of a goal's atoms the failed episodes left holding at their last step, for goals of two or more atoms
    (LIBERO-10's "put the bowl in the drawer and close it": in but open, or neither), and how many of them the
    replay scored a success (failure_modes.py replays on the fast step path: not bit-exact with the final run)."""
    eps = failures["episodes"]
    if not eps or not all("final_goal_atoms" in e for e in eps):
        return ""
    names = failures.get("goal_atoms")  # failure_modes.py writes them; earlier files: read the task's BDDL file
    if names is None:
        suite, task_id = task["spec"].split(":")
        names = fm.goal_atoms(le.resolve_task(suite, int(task_id)).bddl_file)
    part = ""
    if len(names) > 1:
        held = Counter(tuple(n for n, h in zip(names, e["final_goal_atoms"]) if h) for e in eps)
        says = [f"{k} held " + (" and ".join(f"`{n}`" for n in key) + " only" if key else "none")
                for key, k in sorted(held.items(), key=lambda kv: (-kv[1], kv[0]))]  # fmt: skip
        part += f" At the last step, of the goal's {len(names)} atoms: {'; '.join(says)}."
    replayed = sum(bool(e.get("success")) for e in eps)
    if replayed:
        part += f" Replayed, {replayed} of the {len(eps)} succeeded (the replay is not bit-exact with the final run)."
    return part


def layout_rows(tasks: list[dict]) -> list[str]:
    lines = ["| task | sampled layouts | sampled → nearest protocol state, median (min) | protocol → nearest other, "
             "median | widest object range, protocol vs sampled (xy, cm) | draws redrawn | largest slide while "
             "settling, protocol vs sampled |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for t in tasks:
        s = t["layouts"]
        if s is None:
            lines.append(f"| {t['spec']} | – | – | – | – | – | – |")
            continue
        widest = max(s["objects"].items(), key=lambda kv: max(kv[1]["protocol_xy_range_cm"]))
        o = widest[1]
        redrawn = sum(s["draws"][2:])
        near, between = s["sampled_to_nearest_protocol_cm"], s["protocol_to_nearest_protocol_cm"]
        lines.append(f"| {t['spec']} | {s['num_sampled']} | {near['median']} cm ({near['min']}) | {between['median']} "
                     f"cm | `{widest[0]}`: {' x '.join(map(str, o['protocol_xy_range_cm']))} vs "
                     f"{' x '.join(map(str, o['sampled_xy_range_cm']))} | {redrawn} | "
                     f"{s['settle_max_cm']['protocol']} vs {s['settle_max_cm']['sampled']} cm |")  # fmt: skip
    return lines


def bc_start(task: dict) -> str:
    """The BC start, mean / eta0 over the first 50 protocol episodes: a PPO run's iteration-0 evaluation, or for a
    BC-only check (coverage.sh BC_ONLY=1) its bc_start_<mode>.json."""
    if task["run"] is not None:
        return cr.start_cells(task["run"])
    cells = []
    for mode in ("mean", "eta0"):
        path = os.path.join(task["path"], f"bc_start_{mode}.json")
        cells.append(f"{100 * json.load(open(path))['success_rate']:.0f}" if os.path.exists(path) else "–")
    return " / ".join(cells) if cells != ["–", "–"] else "–"


def study_demos(tasks: list[dict]) -> str:
    """The placement and DART noise a study's demonstrations were collected with, as their files record it."""
    kinds = sorted({(t["demos"]["scripted_placement"], t["demos"]["scripted_noise"]) for t in tasks if t["demos"]})
    return "; ".join(f"placement {p}, DART noise {n:g}" for p, n in kinds) or "none collected yet"


def lift_rows(root: str, draw: dict, base: dict) -> list[str]:
    """Per recipe change tried (docs/coverage/lift/<change>/, coverage.sh with its knobs): each task it ran, its
    demonstrations and BC start beside the first recipe's (``base``), and its final success where the run finished."""
    lift = os.path.join(root, "lift")
    changes = sorted(d for d in os.listdir(lift) if os.path.isdir(os.path.join(lift, d))) if os.path.isdir(lift) else []
    if not changes:
        return ["No recipe change run yet."]
    lines = ["| change | task | demos: placement, DART noise, kept of attempts, mean length | "
             "BC start (mean / eta0, 50 ep.) | the first recipe's BC start | final, protocol (200 ep., mean) | "
             "the first recipe's final | status |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for change in changes:
        for spec in draw["order"]:
            name = dir_name(spec)
            if not os.path.isdir(os.path.join(lift, change, "tasks", name)):
                continue
            t, b = load(os.path.join(lift, change), name, spec), base[spec]
            d = t["demos"]
            demo_cell = (f"{d['scripted_placement']}, {d['scripted_noise']:g}, {d['num_demos']} of "
                         f"{d['num_attempts']}, {d['mean_length']:.0f} steps" if d else "–")  # fmt: skip
            final = cr.rate(final_rate(t), t["run"]["final"]["episodes"]) if final_rate(t) is not None else "–"
            base_final = cr.rate(final_rate(b), b["run"]["final"]["episodes"]) if final_rate(b) is not None else "–"
            lines.append(f"| {change} | {spec} | {demo_cell} | {bc_start(t)} | {bc_start(b)} | {final} | "
                         f"{base_final} | {status(t)} |")  # fmt: skip
    return lines


def curves(root: str, sub: str, tasks: list[dict]) -> list[str]:
    """Draws each run's learning curve to <root>/<sub><task>.png; returns the page's image links."""
    links = []
    for t in tasks:
        if t["run"] is not None:
            cr.figure(t["run"], os.path.join(root, sub, f"{t['name']}.png"), f"{t['spec']}: {t['task'].instruction}")
            links.append(f"![{t['spec']}](coverage/{sub}{t['name']}.png)")
    return links


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", default=DOCS, help="reads <docs>/coverage/, writes <docs>/coverage.md")
    docs = parser.parse_args().docs
    root = os.path.join(docs, "coverage")
    draw = json.load(open(os.path.join(root, "draw.json")))
    tasks = [load(root, dir_name(spec), spec) for spec in draw["order"]]
    first = [load(os.path.join(root, "recipe-v1"), dir_name(spec), spec) for spec in draw["order"]]  # the first recipe
    finished = [t for t in tasks if final_rate(t) is not None]
    passed = [t for t in finished if final_rate(t) >= GATE and t["run"]["final"]["env_steps"] <= BUDGET]
    stretch = [t for t in finished if (hit := first_reaching(t["run"], GATE)) and hit[0] <= STRETCH]
    first_done = [t for t in first if final_rate(t) is not None]
    args = next((t["run"]["args"] for t in tasks + first if t["run"] is not None), None)
    recipe = "no run yet"
    if args:
        recipe = (
            f"{args['num_envs']} envs x {args['num_steps']} chunk steps per iteration, actor LR "
            f"{args['actor_lr']:g}, minibatch {args['minibatch_size']}, --train-layouts "
            f"{args.get('train_layouts', 'protocol')}"
        )
    out = [
        "# Coverage: the data generator on ten drawn tasks from all five suites",
        "",
        "Generated by `python scripts/coverage_report.py` from the committed artefacts in `docs/coverage/`; the runs",
        "are `bash scripts/coverage.sh` (resumable, one task after another). The sample was drawn before any run by",
        f"`scripts/coverage_draw.py` (seed {draw['seed']}, {draw['per_suite']} per suite from the tasks the scripted "
        f"expert solves at ≥ 80 %, less the {len(draw['excluded'])} tasks run before: "
        f"{', '.join(draw['excluded'])}). The recipe, one for all tasks: 50 DART demonstrations on sampled layouts, "
        "the MLP BC start (8000 steps), then ppo_diffusion.py for ≤ 1.5M env steps on sampled layouts; every",
        "evaluation on the protocol's 50 init states, which no training or demonstration episode starts from.",
        f"Recipe as the runs record it (args.json): {recipe}. Demonstrations as their files record them: "
        f"{study_demos(tasks)}. This is the second recipe: the first, committed with the draw before any run "
        f"({study_demos(first)}), reached the gate on {sum(final_rate(t) >= GATE for t in first_done)} of the "
        f"{len(first_done)} tasks it finished, and one change to its BC data, chosen by the measured reasons and "
        "tried on the missed tasks first, replaced it "
        "([below](#the-first-recipe-and-the-change-that-replaced-it)).",
        "",
        f"**Goal: ≥ 95 % (≥ 190 of 200 protocol episodes, mean mode) on ≥ 9 of 10 tasks within 1.5M env steps, every "
        f"suite's mean ≥ 95 %. Now: {len(passed)} of {len(finished)} finished tasks ({len(tasks)} drawn) at ≥ 95 %; "
        f"{len(stretch)} reached 95 % in an in-run evaluation (50 episodes) within 750k env steps.**",
        "",
        "## Per task",
        "",
        *task_rows(tasks),
        "",
        "BC start: the in-run evaluation at iteration 0. Final: every action mode over the same 200 protocol episodes "
        "(4 per init state); sampled layouts: 200 layouts drawn from seeds no demonstration or training episode used "
        "(the training distribution, beside the held-out protocol). Wall: on this project's 2-core CPU machines.",
        "",
        "## Per suite",
        "",
        *suite_rows(tasks),
        "",
        "## Why a task misses (measured: scripts/failure_modes.py over its failed protocol episodes)",
        "",
        *failure_lines(tasks),
        "",
        "## The first recipe and the change that replaced it",
        "",
        f"The first recipe's runs (`docs/coverage/recipe-v1/`; demonstrations: {study_demos(first)}), in the draw's "
        "order until the study stopped for the change:",
        "",
        *task_rows([t for t in first if t["demos"] or t["run"] is not None]),
        "",
        "Where they missed (scripts/failure_modes.py over their failed protocol episodes):",
        "",
        *failure_lines(first),
        "",
        "Each change tried runs through the same script with its knobs (`docs/coverage/lift/<change>/`: `set-down`, "
        "`PLACEMENT=set-down`: the expert's demonstrations set an object placed on another object down held instead "
        "of releasing it 1 cm above; `200-demos`, `DEMOS=200`; `dart-noise-0.1`, `NOISE=0.1`: DART noise 0.1 "
        "instead of 0.3; `set-down+dart-noise-0.1`, both, which became the recipe); `BC_ONLY=1` stops at the BC "
        "start. The missed tasks first:",
        "",
        *lift_rows(root, draw, {t["spec"]: t for t in first}),
        "",
        "## The layout split: sampled layouts against the protocol's",
        "",
        "Positions of the movable objects as LIBERO stores them (before the wait steps); a layout's distance to "
        "another is the largest displacement of any object (`libero_env.layout_distance`); "
        "`python scripts/layout_spread.py`.",
        "",
        *layout_rows(tasks),
        "",
        "## Learning curves",
        "",
        *(curves(root, "", tasks) or ["No run of the recipe yet."]),
        "",
        "The first recipe's:",
        "",
        *curves(root, "recipe-v1/", first),
        "",
    ]
    with open(os.path.join(docs, "coverage.md"), "w") as f:
        f.write("\n".join(out))
    print(f"wrote docs/coverage.md ({len(finished)} of {len(tasks)} tasks finished)")


if __name__ == "__main__":
    main()
