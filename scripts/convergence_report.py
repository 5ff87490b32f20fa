"""Learning curves, convergence tables and the ablation table of scripts/convergence.sh -> docs/convergence.md.

    python scripts/convergence_report.py          # reads docs/convergence/{tasks,gaussian,ablations}/, writes the page

Each run directory there holds what convergence.sh exported from a PPO run: args.json, metrics.jsonl (in-run
evaluations every few iterations: 50 protocol episodes in the evaluated mode and in eta0), final_eval.json (every
action mode over the same 200 episodes) and wall_s.txt; an ablation that branched from another run's checkpoint
also has branch.json ({"from": that run, "iteration": N}): its table row then covers only what came after the branch.
Success rates carry their binomial standard error sqrt(p (1 - p) / n) (at 0 or 100 % the exact one-sided 95 %
bound), n the distinct episodes: a noise-free mode
(the Gaussian policy's `mean`) repeats each of the 50 init states' episodes, so its n is 50 however many episodes ran;
"env steps to X %" is the first in-run evaluation at or above X (50 episodes: +-7 points).
The page ends with findings.md, the conclusions drawn from these runs, whose figures are placeholders
``{{kind group/run params}}`` filled from the runs' committed files here (:func:`figure_value`): none is typed.
"""

import argparse
import glob
import json
import math
import os
import re
import sys
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from libero_env import NUM_INIT_STATES  # noqa: E402  (episode e starts from init state e mod 50)

THRESHOLDS = (0.8, 0.9, 0.95)
MODES = ("sample", "mean", "eta0")


def load_run(path: str) -> dict:
    rows = [json.loads(line) for line in open(os.path.join(path, "metrics.jsonl")) if line.strip()]
    run = {"name": os.path.basename(path), "path": path, "rows": rows,
           "args": json.load(open(os.path.join(path, "args.json")))}  # fmt: skip
    final = os.path.join(path, "final_eval.json")
    run["final"] = json.load(open(final)) if os.path.exists(final) else None
    wall = os.path.join(path, "wall_s.txt")
    run["wall_s"] = sum(float(x) for x in open(wall).read().split()) if os.path.exists(wall) else None
    run["noise_free"] = set()  # action modes without any noise (set by the caller: the Gaussian policy's mean)
    branch = os.path.join(path, "branch.json")
    run["branch"] = json.load(open(branch)) if os.path.exists(branch) else None
    return run


def after_branch(run: dict) -> list[dict]:
    """The metric rows of what the run itself did: after its branch point (the evaluation at it included)."""
    start = run["branch"]["iteration"] if run["branch"] else 0
    return [r for r in run["rows"] if r.get("step", 0) > start or (r.get("step") == start and "eval/success_rate" in r)]


def running_seconds(rows: list[dict]) -> list[float]:
    """Seconds the run had been running at each metric row: the time between rows, except that an iteration logged
    long after the row before it (the run was stopped and resumed, possibly sessions later) counts only its own
    env, policy and update time."""
    out, total = [], 0.0
    for prev, r in zip([None, *rows[:-1]], rows):
        if prev is not None:
            gap = r["time"] - prev["time"]
            own = sum(r.get(k, 0.0) for k in ("env_s", "policy_s", "update_s"))
            total += own if own and gap > 2 * own + 600 else gap
        out.append(total)
    return out


def evals(run: dict, key: str = "eval/success_rate") -> list[tuple]:
    """(env steps, success, seconds of running time since the run's first row) of the in-run evaluations."""
    seconds = running_seconds(run["rows"])
    return [(r["env_steps"], r[key], t) for r, t in zip(run["rows"], seconds) if key in r]


def train_curve(run: dict) -> list[tuple]:
    return [(r["env_steps"], r["train_success_rate"]) for r in run["rows"]
            if "train_success_rate" in r and r["train_success_rate"] == r["train_success_rate"]]  # fmt: skip


def rate(p, n) -> str:
    """A success rate with its binomial standard error over n independent episodes; at 0 or 100 %, where that error
    vanishes, the exact one-sided 95 % bound instead (all n succeeded: p >= 0.05^(1/n), 94.2 % for n = 50)."""
    if p is None or p != p:
        return "–"
    if p in (0, 1):
        bound = 0.05 ** (1 / n)
        return f"{100 * p:.1f} ({'≥' if p else '≤'} {100 * (bound if p else 1 - bound):.1f} at 95 %)"
    return f"{100 * p:.1f} ± {100 * math.sqrt(p * (1 - p) / n):.1f}"


def reached(run: dict, threshold: float) -> str:
    for steps, success, seconds in evals(run):
        if success >= threshold:
            return f"{steps / 1e3:.0f}k ({seconds / 60:.0f} min)"
    return "not reached"


def figure(run: dict, out: str, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    train = train_curve(run)
    if train:
        steps, rates = zip(*train)
        w = min(5, len(rates))
        smooth = [
            sum(rates[max(0, i - w + 1) : i + 1]) / len(rates[max(0, i - w + 1) : i + 1]) for i in range(len(rates))
        ]
        ax.plot(steps, rates, color="0.75", lw=0.8, label="rollouts (sample), per iteration")
        ax.plot(steps, smooth, color="C1", lw=1.2, label=f"rollouts (sample), mean of {w} iterations")
    mode = run["args"].get("eval_mode", "eta0")
    colors = {"sample": "C0", "mean": "C3", "eta0": "C2"}  # one colour per action mode, curves and final stars alike
    curve = evals(run)
    if curve:
        ax.plot([c[0] for c in curve], [c[1] for c in curve], "o-", color=colors.get(mode, "C0"),
                label=f"eval: {mode} (50 episodes)")  # fmt: skip
    eta0 = evals(run, "eval_eta0/success_rate")
    if eta0 and mode != "eta0":
        ax.plot([c[0] for c in eta0], [c[1] for c in eta0], "s--", color="C2", label="eval: eta0 (50 episodes)")
    if run["final"]:
        f = run["final"]
        for m in MODES:
            if m in f:
                p, n = f[m]["success_rate"], distinct_episodes(run, m)
                ax.errorbar([f["env_steps"]], [p], yerr=[1.96 * math.sqrt(p * (1 - p) / n)], fmt="*", ms=10,
                            color=colors[m], label=f"final: {m}, {n} episodes (95% CI)")  # fmt: skip
    start = os.path.join(run["path"], "bc_start_mean_eval.json")
    if os.path.exists(start):  # the BC start evaluated in mean mode with evaluate.py
        e = json.load(open(start))
        ax.plot([0], [e["success_rate"]], "*", ms=10, color=colors["mean"],
                label=f"BC start: mean, {e['num_episodes']} episodes")  # fmt: skip
    ax.set(xlabel="environment steps", ylabel="success rate", ylim=(-0.02, 1.02), title=title)
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def distinct_episodes(run: dict, mode: str) -> int:
    """The final evaluation's independent episodes in ``mode``: a noise-free mode repeats each init state's."""
    n = run["final"]["episodes"]
    return min(n, NUM_INIT_STATES) if mode in run["noise_free"] else n


def final_cells(run: dict) -> list[str]:
    f = run["final"]
    if f is None:
        return ["(unfinished)"] * 4
    cells = [rate(f[m]["success_rate"], distinct_episodes(run, m)) + (" †" if m in run["noise_free"] else "")
             if m in f else "–" for m in MODES]  # fmt: skip
    std = f.get(f["eval_mode"], {}).get("action_std")
    return cells + [f"{std:.3f}" if std is not None and std == std else "–"]


def start_cells(run: dict) -> str:
    first = [r for r in run["rows"] if r.get("step") == 0 and "eval/success_rate" in r]
    if not first:
        return "–"
    r = first[0]
    eta0 = r.get("eval_eta0/success_rate")  # a Gaussian policy has no eta0
    return f"{100 * r['eval/success_rate']:.0f} / " + (f"{100 * eta0:.0f}" if eta0 is not None else "–")


def task_table(runs: list[dict], label: str) -> list[str]:
    head = (f"| {label} | eval mode | BC start (eval mode / eta0, 50 ep.) | env steps | wall | "
            + " | ".join(f"to {int(100 * t)} %" for t in THRESHOLDS)
            + " | final sample | final mean | final eta0 | action std |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for run in runs:
        f, last = run["final"], run["rows"][-1]
        steps = f["env_steps"] if f else last.get("env_steps", 0)
        wall = f"{run['wall_s'] / 3600:.1f} h" if run["wall_s"] else "–"
        lines.append(f"| {run['name']} | {run['args'].get('eval_mode', 'eta0')} | {start_cells(run)} | "
                     f"{steps / 1e3:.0f}k | {wall} | " + " | ".join(reached(run, t) for t in THRESHOLDS) + " | "
                     + " | ".join(final_cells(run)) + " |")  # fmt: skip
    return lines


def rollout_success(run: dict, first: bool, n: int = 5) -> float:
    """Mean success of the rollouts (the policy PPO trains) over the first or last ``n`` iterations."""
    rows = [r["train_success_rate"] for r in after_branch(run)
            if r.get("train_success_rate") == r.get("train_success_rate") and "train_success_rate" in r]  # fmt: skip
    rows = rows[:n] if first else rows[-n:]
    return sum(rows) / len(rows) if rows else float("nan")


def noise_scale(a: dict) -> str:
    """The rollout chain's noise scale of a run: one value, or the step to --noise-scale-final (1-based iteration)."""
    scale = f"{a.get('noise_scale', 1.0):g}"
    if a.get("noise_scale_final") is None:
        return scale
    switch = round(a.get("noise_scale_switch", 0.78) * a["num_iterations"])
    return f"{scale} → {a['noise_scale_final']:g} from iteration {switch + 1}"


def ablation_table(runs: list[dict]) -> list[str]:
    lines = ["| run | task | envs x chunks | actor LR | clip (first -> last step) | min std | noise scale | "
             "gamma (success reward) | target KL | gradient steps per iteration (epochs x minibatches) | env steps | "
             "rollout success, first 5 -> last 5 iterations | in-run evals (eval mode; eta0) | mean EV | "
             "final (200 ep., every mode) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for run in runs:
        a, own = run["args"], {**run, "rows": after_branch(run)}
        gaussian = "ft_denoising_steps" not in a  # a variation of the Gaussian baseline (ppo_gaussian.py's args)
        lr = f"{a['actor_lr']:g}" + (" const" if a.get("constant_lr") else f" cos -> {a.get('actor_lr_min', 0):g}")
        if a.get("constant_lr") and a.get("actor_lr_decay_start", 1.0) < 1.0:
            start = round(a["actor_lr_decay_start"] * a["num_iterations"])
            lr += f", cos -> {a['actor_lr_min']:g} from iteration {start}"
        clip = f"{a['clip_coef']:g}"
        if not gaussian and not a.get("constant_clip"):  # DPPO's clip, growing over the denoising steps
            clip = f"{a['clip_coef_base']:g} -> {a['clip_coef']:g}"
        curve = "–"
        if evals(own):
            curve = " → ".join(f"{100 * s:.0f}" for _, s, _ in evals(own))
            eta0 = evals(own, "eval_eta0/success_rate")
            curve += f"; {' → '.join(f'{100 * s:.0f}' for _, s, _ in eta0)}" if eta0 else ""
        updates = [r for r in own["rows"] if "explained_variance" in r]
        ev = sum(r["explained_variance"] for r in updates) / len(updates) if updates else float("nan")
        final = "–"
        if run["final"]:
            f = run["final"]
            final = "; ".join(f"{m} " + rate(f[m]["success_rate"], distinct_episodes(run, m))
                              + (" †" if m in run["noise_free"] else "") for m in MODES if m in f)  # fmt: skip
        steps = max(r.get("env_steps", 0) for r in run["rows"])
        pairs = a["num_envs"] * a["num_steps"] * (1 if gaussian else a["ft_denoising_steps"])  # (chunk, step) pairs
        minibatches = max(1, pairs // a["minibatch_size"])  # full minibatches, the remainder dropped
        grad = f"{a['update_epochs'] * minibatches} ({a['update_epochs']} x {minibatches})"
        success_reward = " (until the limit)" if a.get("reward_until_limit") else ""
        name, task = run["name"].split("__")
        task += " (Gaussian)" if gaussian else ""
        if run["branch"]:  # its first iterations are the other run's
            name += f" (from iteration {run['branch']['iteration']} of {run['branch']['from']})"
        lines.append(f"| {name} | {task} | {a['num_envs']} x {a.get('num_steps')} | {lr} | {clip} | "
                     f"{'–' if gaussian else format(a.get('min_std', 0.1), 'g')} | "
                     f"{'–' if gaussian else noise_scale(a)} | {a.get('gamma', 0.999):g}{success_reward} | "
                     f"{a.get('target_kl')} | {grad} | {steps / 1e3:.0f}k | "
                     f"{100 * rollout_success(run, True):.0f} → {100 * rollout_success(run, False):.0f} | {curve} | "
                     f"{ev:.2f} | {final} |")  # fmt: skip
    return lines


def bc_start_table(root: str) -> list[str]:
    """The BC starts of candidate tasks (`BC_ONLY=1 bash scripts/convergence.sh ...`): success of the evaluated mode
    and of eta0 over the same protocol episodes, to choose a task by the strength of its start."""
    starts = {}  # task -> mode -> (successes, episodes)
    for path in sorted(glob.glob(os.path.join(root, "bc_starts", "*_task*_*.json"))):
        task, mode = os.path.basename(path)[: -len(".json")].rsplit("_", 1)
        episodes = json.load(open(path))["episodes"]
        starts.setdefault(task, {})[mode] = (sum(e["success"] for e in episodes), len(episodes))
    lines = ["| task | mean | eta0 |", "|---|---|---|"]
    for task, modes in starts.items():
        cells = [f"{100 * modes[m][0] / modes[m][1]:.0f} % ({modes[m][0]}/{modes[m][1]})" if m in modes else "–"
                 for m in ("mean", "eta0")]  # fmt: skip
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return lines if starts else []


def failure_table(runs: list[tuple[str, dict]]) -> list[str]:
    """Where the evaluated mode fails in the final evaluation (runs whose final_eval.json keeps every episode's
    outcome): episode e starts from init state e mod 50, so failures piling up on a few init states point at hard
    scenes, failures spread thinly over many at the draw of the chain's noise."""
    lines = ["| run | mode | failures | init states with a failure | init states failing in at least half their "
             "episodes (failures / episodes) |", "|---|---|---|---|---|"]  # fmt: skip
    for label, run in runs:
        f = run["final"] or {}
        mode = f.get("eval_mode")
        outcomes = f.get(mode, {}).get("successes")
        if outcomes is None:
            continue
        per_state = {}  # init state -> [failures, episodes]
        for e, success in enumerate(outcomes):
            count = per_state.setdefault(e % NUM_INIT_STATES, [0, 0])
            count[0] += not success
            count[1] += 1
        failing = [s for s, (fails, _) in per_state.items() if fails]
        hard = ", ".join(f"{s} ({per_state[s][0]}/{per_state[s][1]})" for s in sorted(failing)
                         if 2 * per_state[s][0] >= per_state[s][1])  # fmt: skip
        lines.append(f"| {label} | {mode} | {sum(not x for x in outcomes)} / {len(outcomes)} | "
                     f"{len(failing)} of {len(per_state)} | {hard or 'none'} |")  # fmt: skip
    return lines if len(lines) > 2 else []


# Figures in findings.md are computed, not typed: ``{{kind group/run params}}`` is replaced by the figure read from that
# run's committed files (a run that is not there, or a figure it does not hold, stops the report).
FIGURE = re.compile(r"\{\{(\w+) ([\w.-]+/[\w.-]+)((?: [\w.=<>/-]+)*)\}\}")


def figure_value(kind: str, run: dict, *params: str, runs_by_name: Optional[dict] = None) -> str:
    """One figure of a run, by kind (the run's final evaluation, metrics rows, wall time and evaluation files):

    final MODE            success ± standard error over the final evaluation's distinct episodes
    pct / length MODE     that success in % (one decimal) / the mean episode length in steps
    std [MODE]            the action std of the evaluated (or named) mode
    curve [eta0]          the in-run evaluations in % (the evaluated mode, or eta0)
    eval N [eta0]         the in-run evaluation at iteration N (%)
    reached X             env steps (k) of the first in-run evaluation at or above X
    start [eta0]          the BC start's in-run evaluation (iteration 0, %)
    rollout first|last [N]  mean rollout success (%) over the first or last N (5) iterations
    blocks [FROM TO]      rollout success (%) per block of ten iterations (1-based iterations FROM..TO)
    ev [FROM TO]          mean critic explained variance
    metric KEY mean|median|max FORMAT [FROM TO]  a logged quantity (approx_kl, clipfrac...) in a format spec
    steps / wall / minutes  env steps run / wall time (h / min)
    evaluated FILE        an evaluate.py result in the run's directory ("7.5 % (15/200)")
    diff MODE OTHER OTHER_MODE [OTHER_ITERATION]  the difference to another run's final rate (points, standard errors)
    same MODE OTHER       the share (%) of final episodes whose outcome the other run repeats
    fails / failstates MODE  failed final episodes / init states with a failure
    histogram / binomial MODE  init states by successful episodes, counted / expected if episodes were independent
    branches MODE OTHER...  mean and spread of the final rates against the spread 200 episodes alone give

    Any kind takes ``at=N`` (the run as it stood at iteration N: rows up to N, final_eval_iterationN.json),
    ``after=N`` or ``upto=N`` (its rows after / up to iteration N)."""
    at = [int(p[3:]) for p in params if p.startswith("at=")]
    params = tuple(p for p in params if not p.startswith("at="))
    after = [int(p[6:]) for p in params if p.startswith("after=")]
    params = tuple(p for p in params if not p.startswith("after="))
    if at:  # the run as it stood at iteration N: its rows up to N and the final evaluation it kept from then
        final = json.load(open(os.path.join(run["path"], f"final_eval_iteration{at[0]}.json")))
        run = {**run, "rows": [r for r in run["rows"] if r.get("step", 0) <= at[0]], "final": final}
    upto = [int(p[5:]) for p in params if p.startswith("upto=")]
    params = tuple(p for p in params if not p.startswith("upto="))
    if after:  # what the run did after iteration N
        run = {**run, "rows": [r for r in run["rows"] if r.get("step", 0) > after[0]]}
    if upto:  # what the run did up to iteration N
        run = {**run, "rows": [r for r in run["rows"] if r.get("step", 0) <= upto[0]]}
    f = run["final"]
    rows = [r for r in run["rows"] if "train_success_rate" in r and r["train_success_rate"] == r["train_success_rate"]]
    span = (int(params[0]), int(params[1])) if len(params) == 2 and kind in ("blocks", "ev") else (1, 10**9)
    rows = [r for r in rows if span[0] <= r["step"] <= span[1]]
    if kind == "final":
        return rate(f[params[0]]["success_rate"], distinct_episodes(run, params[0]))
    if kind == "pct":
        return f"{100 * f[params[0]]['success_rate']:.1f}"
    if kind == "length":
        return f"{f[params[0]]['episode_length']:.0f}"
    if kind == "std":
        return f"{f[params[0] if params else f['eval_mode']]['action_std']:.3f}"
    if kind == "curve":
        return " / ".join(f"{100 * s:.0f}" for _, s, _ in evals(run, f"eval_{params[0]}/success_rate" if params else
                                                                 "eval/success_rate"))  # fmt: skip
    if kind == "reached":
        return next(f"{steps / 1e3:.0f}k" for steps, s, _ in evals(run) if s >= float(params[0]))
    if kind == "rollout":
        return f"{100 * rollout_success(run, params[0] == 'first', int(params[1]) if len(params) > 1 else 5):.0f}"
    if kind == "blocks":
        blocks = {}
        for r in rows:
            blocks.setdefault((r["step"] - 1) // 10, []).append(r["train_success_rate"])
        return " / ".join(f"{100 * sum(b) / len(b):.0f}" for _, b in sorted(blocks.items()))
    if kind == "ev":
        ev = [
            r["explained_variance"]
            for r in run["rows"]
            if "explained_variance" in r and span[0] <= r["step"] <= span[1]
        ]
        return f"{sum(ev) / len(ev):.2f}"
    if kind == "wall":
        return f"{run['wall_s'] / 3600:.1f}"
    if kind == "minutes":
        return f"{run['wall_s'] / 60:.0f}"
    if kind == "start":
        key = f"eval_{params[0]}/success_rate" if params else "eval/success_rate"
        return f"{100 * next(r[key] for r in run['rows'] if r.get('step') == 0 and key in r):.0f}"
    if kind == "diff":  # diff MODE OTHER_RUN OTHER_MODE [OTHER_ITERATION]: this run's final rate against another's
        other = runs_by_name[params[1]]
        if len(params) > 3:
            final = json.load(open(os.path.join(other["path"], f"final_eval_iteration{params[3]}.json")))
            other = {**other, "final": final}
        p1, n1 = f[params[0]]["success_rate"], distinct_episodes(run, params[0])
        p2, n2 = other["final"][params[2]]["success_rate"], distinct_episodes(other, params[2])
        se = math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
        return f"{100 * (p1 - p2):+.1f} points, {abs(p1 - p2) / se:.1f} standard errors of the difference"
    if kind == "same":  # same MODE OTHER_RUN: the share of final episodes (%) whose outcome the other run's repeats
        mine, theirs = f[params[0]]["successes"], runs_by_name[params[1]]["final"][params[0]]["successes"]
        return f"{100 * sum(a == b for a, b in zip(mine, theirs)) / len(mine):.0f}"
    if kind in ("fails", "failstates"):  # fails / failstates MODE: failed final episodes / init states with a failure
        failed = [e for e, ok in enumerate(f[params[0]]["successes"]) if not ok]
        return str(len(failed) if kind == "fails" else len({e % NUM_INIT_STATES for e in failed}))
    if kind == "branches":  # branches MODE OTHER...: the spread of final rates over this run and the others
        rates = [f[params[0]]["success_rate"]] + [
            runs_by_name[o]["final"][params[0]]["success_rate"] for o in params[1:]
        ]
        mean = sum(rates) / len(rates)
        sd = math.sqrt(sum((r - mean) ** 2 for r in rates) / (len(rates) - 1))
        noise = math.sqrt(mean * (1 - mean) / f["episodes"])
        return (
            f"average {100 * mean:.1f} %, standard deviation {100 * sd:.1f} points across the {len(rates)}, against "
            f"{100 * noise:.1f} points expected from {f['episodes']} episodes alone"
        )
    if kind in ("histogram", "binomial"):  # init states by successes of their episodes: counted / if independent
        outcomes = f[params[0]]["successes"]
        per = len(outcomes) // NUM_INIT_STATES
        if kind == "histogram":
            counts = [sum(outcomes[e::NUM_INIT_STATES]) for e in range(NUM_INIT_STATES)]
            return " / ".join(str(counts.count(k)) for k in range(per + 1))
        p = sum(outcomes) / len(outcomes)
        return " / ".join(
            f"{NUM_INIT_STATES * math.comb(per, k) * p**k * (1 - p) ** (per - k):.1f}" for k in range(per + 1)
        )
    if kind == "eval":  # eval N [eta0]: the in-run evaluation at iteration N (%)
        key = f"eval_{params[1]}/success_rate" if len(params) > 1 else "eval/success_rate"
        return f"{100 * next(r[key] for r in run['rows'] if r.get('step') == int(params[0]) and key in r):.0f}"
    if kind == "evaluated":  # evaluated FILE: an evaluate.py result kept in the run's directory (success, episodes)
        result = json.load(open(os.path.join(run["path"], params[0])))
        n = result["num_episodes"]
        return f"{100 * result['success_rate']:.1f} % ({round(result['success_rate'] * n)}/{n})"
    if kind == "metric":  # metric KEY mean|median|max FORMAT [FROM TO]: a logged quantity over iterations FROM..TO
        key, stat, spec = params[:3]
        lo, hi = (int(params[3]), int(params[4])) if len(params) == 5 else (1, 10**9)
        values = [r[key] for r in run["rows"] if key in r and lo <= r.get("step", 0) <= hi]
        ordered = sorted(values)
        value = {"max": ordered[-1], "mean": sum(values) / len(values), "median": ordered[len(ordered) // 2]}[stat]
        return re.sub(r"e([+-])0*(\d)", lambda m: f"e{m.group(1).strip('+')}{m.group(2)}", format(value, spec))
    if kind == "steps":
        return f"{int(max(r.get('env_steps', 0) for r in run['rows'])):,}"
    raise ValueError(f"unknown figure kind '{kind}'")


def episode_figure(kind: str, path: str, *params: str) -> str:
    """A figure of the per-episode records of a committed analysis file (evaluate.py's or failure_modes.py's JSON):
    count COND...: the episodes that meet every condition (``field=v``, ``field>v``, ``field<v``; success=1 for
    True); avg FIELD FORMAT COND...: the field's mean over those episodes; rate: its success rate (%, one decimal);
    states K: init states with exactly K failed episodes (K = any: with at least one)."""
    episodes = json.load(open(path))["episodes"]

    def meets(e: dict, cond: str) -> bool:
        field, op, value = re.match(r"(\w+)([=<>])(.+)", cond).groups()
        x = float(e[field]) if e[field] is not None else float("nan")
        return {"=": x == float(value), "<": x < float(value), ">": x > float(value)}[op]

    if kind == "rate":
        return f"{100 * sum(e['success'] for e in episodes) / len(episodes):.1f}"
    if kind == "states":
        fails = {}
        for e in episodes:
            fails[e["init_state"]] = fails.get(e["init_state"], 0) + (not e["success"])
        return str(sum(1 for n in fails.values() if (n > 0 if params[0] == "any" else n == int(params[0]))))
    conds = params if kind == "count" else params[2:]
    chosen = [e for e in episodes if all(meets(e, c) for c in conds)]
    if kind == "count":
        return str(len(chosen))
    if kind == "avg":
        return format(sum(float(e[params[0]]) for e in chosen) / len(chosen), params[1])
    raise ValueError(f"unknown figure kind '{kind}' for an analysis file")


def fill_figures(text: str, runs: dict, root: str) -> str:
    """findings.md with every ``{{kind group/run params}}`` replaced by its figure (see :func:`figure_value`); a name
    ending in .json is an analysis file under the report's root (see :func:`episode_figure`)."""

    def fill(m: re.Match) -> str:
        if m.group(2).endswith(".json"):
            path = os.path.join(root, m.group(2))
            if not os.path.exists(path):
                raise SystemExit(f"error: findings.md names {m.group(2)}, which is not under {root}; fix the name.")
            return episode_figure(m.group(1), path, *m.group(3).split())
        if m.group(2) not in runs:
            raise SystemExit(f"error: findings.md names {m.group(2)}, which is no run of the report; fix the name.")
        return figure_value(m.group(1), runs[m.group(2)], *m.group(3).split(), runs_by_name=runs)

    return FIGURE.sub(fill, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="docs/convergence")
    parser.add_argument("--out", default="docs/convergence.md")
    args = parser.parse_args()
    groups = {}
    for g in ("tasks", "gaussian", "ablations"):
        paths = sorted(glob.glob(os.path.join(args.root, g, "*")))
        groups[g] = [load_run(p) for p in paths if os.path.exists(os.path.join(p, "metrics.jsonl"))]
    for run in groups["gaussian"] + [r for r in groups["ablations"] if "ft_denoising_steps" not in r["args"]]:
        run["noise_free"] = {"mean"}  # the Gaussian's mean action: a function of the observation alone
    for g, runs in groups.items():
        for run in runs:
            figure(run, os.path.join(run["path"], "learning_curve.png"), f"{g}: {run['name']}")
    machine = os.path.join(args.root, "machine.txt")
    lines = ["# Convergence of diffusion PPO on this CPU", "",
             "Generated by `python scripts/convergence_report.py` from the runs of `bash scripts/convergence.sh` "
             "(artefacts in `docs/convergence/`). Machine: "
             + (open(machine).read().strip() if os.path.exists(machine) else "not recorded") + ".", ""]  # fmt: skip
    if groups["tasks"]:
        lines += ["## Diffusion PPO from the weak BC starts", ""] + task_table(groups["tasks"], "task")
        lines += [
            "",
            '"to X %": the first in-run evaluation (50 episodes, in the run\'s eval mode) at or above X; '
            "the final columns are every mode on the same 200 episodes at the end of the run.",
            "",
        ]
        lines += [f"![{r['name']}](convergence/tasks/{r['name']}/learning_curve.png)" for r in groups["tasks"]] + [""]
    if groups["gaussian"]:
        lines += ["## Gaussian PPO at the same budget", ""] + task_table(groups["gaussian"], "task") + [""]
        lines += ["† noise-free: the episodes of an init state repeat one another, so the standard error is over the "
                  f"{NUM_INIT_STATES} init states.", ""]  # fmt: skip
        lines += [f"![{r['name']}](convergence/gaussian/{r['name']}/learning_curve.png)" for r in groups["gaussian"]]
        lines += [""]
    if groups["ablations"]:
        table = ablation_table(groups["ablations"])
        lines += ["## Every setting tried", ""] + table + [""]
        if any("†" in line for line in table):
            lines += ["† noise-free: the standard error is over the init states (as above).", ""]
    starts = bc_start_table(args.root)
    if starts:
        lines += ["## BC starts of candidate tasks", "",
                  "The study's weak BC start (10 DART demos, 8000 MLP steps, state mode) on tasks considered for the "
                  "comparison, before any PPO, over the protocol's first 50 init states "
                  "(`BC_ONLY=1 bash scripts/convergence.sh <tasks>`).", ""]  # fmt: skip
        lines += starts + [""]
    failures = failure_table([(f"{g}/{r['name']}", r) for g, runs in groups.items() for r in runs])
    if failures:
        lines += ["## Where the evaluated policy fails (final evaluation)", ""] + failures + [""]
    findings = os.path.join(args.root, "findings.md")  # the measured conclusions, written from the tables above
    if os.path.exists(findings):
        runs = {f"{g}/{r['name']}": r for g, group in groups.items() for r in group}
        lines += [fill_figures(open(findings).read().strip(), runs, args.root), ""]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}: {', '.join(f'{len(v)} {k}' for k, v in groups.items())}")


if __name__ == "__main__":
    main()
