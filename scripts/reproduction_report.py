"""Tables, figures and the claims table of the CPU reproduction (scripts/reproduce_cpu.sh) -> docs/reproduction.md.

    python scripts/reproduction_report.py      # reads docs/reproduction/results/, writes docs/reproduction{.md,/}

The study's small artefacts are committed where scripts/reproduce_cpu.sh writes them (--results: evaluation JSONs,
budgets, the data-quality metrics of each source); the PPO teachers' metrics come from scripts/convergence.sh's
exports (--convergence-root) or its run directories (--study-root). For every task the report draws both
algorithms' learning curves and the data-quality figure into docs/reproduction/<suite>_task<NN>/, and writes
docs/reproduction.md: per task, the success (in the evaluated mode) of BC start and final policy of both policy
classes (4 seeds x 50 init states), the data quality of the four sources and the students trained on them; across
tasks, the student table (the paper's Table I in miniature) and the claims table. Success rates carry their
binomial standard error sqrt(p (1 - p) / n) (at 0 or 100 %, where it vanishes, the exact one-sided 95 % bound).
"""

import argparse
import glob
import json
import math
import os
import sys
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from scripts.convergence_report import rate  # noqa: E402  (the same rate format on both pages)

POLICIES = [("diffusion_bc", "Diffusion, BC start"), ("diffusion_ppo", "Diffusion, PPO"),
            ("gaussian_bc", "Gaussian, BC start"), ("gaussian_ppo", "Gaussian, PPO")]  # fmt: skip
SOURCES = [("scripted_dart", "DART demos (human stand-in)"), ("scripted", "clean scripted expert"),
           ("diffusion_rl", "diffusion RL"), ("gaussian_rl", "Gaussian RL")]  # fmt: skip
COLORS = {"scripted_dart": "tab:gray", "scripted": "tab:green", "diffusion_rl": "tab:blue", "gaussian_rl": "tab:orange"}
TEACHER_MIN = 0.90  # a diffusion teacher below this success is reported as such and its task's students are marked
WEAK = " ‡"  # the mark
EXTRA = " §"  # a task with results that is not one of the study's (--tasks): reported, not pooled
STUDY_TASKS = ["libero_object:0", "libero_object:1", "libero_spatial:0", "libero_goal:7"]  # reproduce_cpu.sh's default
REPEATS = " †"  # a rate whose episodes repeat each init state's: its standard error is over the init states
REPEATS_NOTE = (
    "†: each init state's episodes are identical across the evaluation seeds (a noise-free policy on the "
    "deterministic simulator), so the standard error is over the init states, not the episodes."
)


def success(results: str, tag: str, suite: str, nn: str):
    """(successes, episodes) of a checkpoint over all its evaluation seeds, or None."""
    eps = episodes(results, tag, suite, nn)
    return (sum(e["success"] for e in eps), len(eps)) if eps else None


def fmt_rate(r, independent=None) -> str:
    """k/n as "p ± standard error (k/n)"; the error over ``independent`` samples when fewer than n are (marked †)."""
    if r is None:
        return "–"
    k, n = r
    m = independent or n
    return f"{rate(k / n, m)}{REPEATS if m < n else ''} ({k}/{n})"


def episodes(results: str, tag: str, suite: str, nn: str) -> list[dict]:
    files = sorted(glob.glob(os.path.join(results, "eval", f"{tag}_seed*", suite, f"task{nn}.json")))
    return [e for f in files for e in json.load(open(f))["episodes"]]


def independent_episodes(eps: list[dict]) -> int:
    """How many of a checkpoint's episodes are independent samples: all of them, unless each init state's episodes
    (one per evaluation seed) are identical in outcome and length, as a noise-free policy (the Gaussian's mean) on
    the deterministic simulator makes them; then only the init states count."""
    outcomes = {}
    for e in eps:
        if "init_state" not in e:
            return len(eps)
        outcomes.setdefault(e["init_state"], set()).add((e["success"], e["length"]))
    repeated = len(outcomes) < len(eps) and all(len(v) == 1 for v in outcomes.values())
    return len(outcomes) if repeated else len(eps)


def rate_cell(results: str, tag: str, suite: str, nn: str) -> str:
    """A checkpoint's success over all its evaluation seeds, its standard error over its independent episodes."""
    eps = episodes(results, tag, suite, nn)
    return fmt_rate((sum(e["success"] for e in eps), len(eps)) if eps else None, independent_episodes(eps))


def budget(results: str, key: str) -> dict:
    """The budget a task's study started with (scripts/reproduce_cpu.sh writes results/budget/<task>.env)."""
    path = os.path.join(results, "budget", f"{key}.env")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return dict(line.strip().split("=", 1) for line in f if "=" in line)


def ppo_run_dir(study_root: str, convergence_root: str, alg: str, suite: str, nn: str) -> str:
    """A task's PPO run of one policy class: scripts/convergence.sh's export (committed: tasks/ for the diffusion
    recipe, gaussian/ for the baseline), its run directory (ppo/recipe/ under the teachers' root) or the earlier
    study's (runs/)."""
    export = os.path.join(convergence_root, "tasks" if alg == "diffusion" else "gaussian", f"{suite}_task{nn}")
    for path in (export, *(os.path.join(study_root, sub, f"ppo_{alg}", suite, f"task{nn}__seed0")
                           for sub in (os.path.join("ppo", "recipe"), "runs"))):  # fmt: skip
        if os.path.exists(os.path.join(path, "metrics.jsonl")):
            return path
    return export


def wall_hours(run_dir: str):
    """Wall time of a PPO run in hours (wall_s.txt: one line per invocation), or None."""
    path = os.path.join(run_dir, "wall_s.txt")
    if not os.path.exists(path):
        return None
    return sum(float(x) for x in open(path).read().split()) / 3600


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def learning_curves(runs: dict, out_png: str, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for name, path in runs.items():
        color = {"diffusion": "tab:blue", "gaussian": "tab:orange"}[name]
        if not os.path.exists(path):
            continue
        rows = read_jsonl(path)
        evals = [(r["env_steps"], r["eval/success_rate"]) for r in rows if "eval/success_rate" in r]
        train = [(r["env_steps"], r["train_success_rate"]) for r in rows
                 if "train_success_rate" in r and not math.isnan(r["train_success_rate"])]  # fmt: skip
        if evals:
            ax.plot(*zip(*evals), "o-", color=color, label=f"{name}: evaluated policy (50 episodes)")
        if train:
            xs, ys = zip(*train)
            k = 10
            smooth = [sum(ys[max(0, i - k + 1) : i + 1]) / len(ys[max(0, i - k + 1) : i + 1]) for i in range(len(ys))]
            ax.plot(xs, smooth, "-", color=color, alpha=0.5, label=f"{name}: rollout success (running mean of 10)")
    ax.set_xlabel("env steps")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.02, 1.02)  # markers at 0 and 100 % drawn whole
    ax.set_title(textwrap.fill(title, 80), fontsize=9)  # long task instructions wrap instead of running off the figure
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def source_metrics(analysis: str) -> dict:
    """Source -> data-quality metrics of a task: analyze.py's per_task entries from the report over all sources
    (analysis/<task>/metrics.json) and from one report per source (analysis/<task>/<source>/metrics.json)."""
    out = {}
    for path in sorted(glob.glob(os.path.join(analysis, "metrics.json")) +
                       glob.glob(os.path.join(analysis, "*", "metrics.json"))):  # fmt: skip
        for per_source in json.load(open(path))["per_task"].values():
            out.update(per_source)
    return out


def quality_figure(metrics: dict, out_png: str, title: str) -> None:
    """Length, mean squared jerk and action std of each source (± one standard error over its trajectories)."""
    names = [(src, label) for src, label in SOURCES if "length_mean" in metrics.get(src, {})]
    panels = [("length_mean", "length_std", "avg. length (steps)"), ("msj_mean", "msj_std", "mean sq. jerk (m²/s⁶)"),
              ("consistency_mean_std_all", None, "action std across trajectories")]  # fmt: skip
    fig, axes = plt.subplots(1, 3, figsize=(9.6, 3.2))
    for ax, (key, std_key, ylabel) in zip(axes, panels):
        values = [metrics[src][key] for src, _ in names]
        errors = [metrics[src][std_key] / math.sqrt(max(metrics[src]["successful"], 1)) if std_key
                  else metrics[src].get("consistency_se_all", 0.0) for src, _ in names]  # fmt: skip
        ax.bar(range(len(names)), values, yerr=errors, color=[COLORS[src] for src, _ in names], capsize=3)
        ax.set_xticks(range(len(names)), [label.split(" (")[0] for _, label in names], rotation=30, fontsize=7)
        ax.set_ylabel(ylabel, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def explanations(keys, results, tasks, lengths, smooth, students) -> list[str]:
    """Measurements that explain where the CPU study and the paper disagree (tables; the text around them in
    docs/reproduction.md's closing section is generated from the same numbers)."""
    out = ["", "## Why the results differ from the paper's (measured)", "",
           "**1. Teachers and their students.** The paper collects from RL policies trained to high success; each "
           "task's budget is stated above, and a teacher below 90 % is marked. Teacher (final policy) vs its "
           "student:", "",
           "| task | diffusion PPO | its student | Gaussian PPO | its student | DART student |",
           "|---|---|---|---|---|---|"]  # fmt: skip
    for (suite, nn), key in zip(tasks, keys):
        cells = [rate_cell(results, "diffusion_ppo", suite, nn), fmt_rate(students["diffusion_rl"].get(key)),
                 rate_cell(results, "gaussian_ppo", suite, nn), fmt_rate(students["gaussian_rl"].get(key)),
                 fmt_rate(students["scripted_dart"].get(key))]  # fmt: skip
        out.append(f"| {key} | " + " | ".join(cells) + " |")
    if any(REPEATS in line for line in out[-len(keys) :]):
        out += ["", REPEATS_NOTE]
    out += ["", "**2. Length.** Mean length (steps) of the *successful* evaluation episodes of the BC start and of the "
            "final policy (did PPO make the policy faster?):", "",
            "| task | diffusion BC | diffusion PPO | Gaussian BC | Gaussian PPO |",
            "|---|---|---|---|---|"]  # fmt: skip
    for key in keys:
        row = lengths.get(key, {})
        cells = [f"{row[t]:.1f}" if row.get(t) else "–" for t in ("diffusion_bc", "diffusion_ppo", "gaussian_bc",
                                                                 "gaussian_ppo")]  # fmt: skip
        out.append(f"| {key} | " + " | ".join(cells) + " |")
    out += ["", "**3. Smoothness within vs across chunks.** Mean squared change of the arm action between consecutive "
            "steps, at steps where an 8-action chunk starts (a chunked policy re-plans there) and inside chunks, and "
            "the episodes whose largest change falls on a chunk start (1 in 8 by chance). The scripted sources act "
            "every step: their 8-step grid is arbitrary (the clean expert's phase switches fall on similar steps in "
            "every episode, so its two means differ by chance of timing).", "",
            "| task | source | at chunk starts | within chunks | ratio | largest change at a chunk start |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    names = dict(SOURCES)
    for key in keys:
        for src, m in smooth.get(key, {}).items():
            out.append(f"| {key} | {names[src]} | {m['boundary']:.4f} | {m['within']:.4f} | {m['ratio']:.1f} | "
                       f"{m['largest_at_boundary']}/{m['trajectories']} |")  # fmt: skip
    out += ["", "**4. Collection.** Final policies are rolled out in the mode they are evaluated in (each task's "
            "budget names it: `mean`, the trained eta = 1 chain without its noise after x_K, by default; the "
            "Gaussian's mean); the DART demos store the expert's noise-free labels while their states carry the "
            "executed noise, which is what makes their end-effector path jerky.", ""]  # fmt: skip
    return out


def reasons(
    complete: list[tuple[str, str]], results: str, lengths: dict, smooth: dict, quality: dict, averages: dict
) -> dict:
    """The measurement that bears on each claim, over the complete tasks ((suite, nn) pairs): the text the claims
    table shows where a claim does not hold (its numbers are in the tables of the section after it)."""
    keys = [f"{suite}_task{nn}" for suite, nn in complete]

    def pooled(tag):  # a checkpoint's success, pooled over the complete tasks, in %
        rates = [success(results, tag, suite, nn) for suite, nn in complete]
        return 100 * sum(r[0] for r in rates) / sum(r[1] for r in rates) if all(rates) else float("nan")

    def student(src):  # a source's student, pooled over the complete tasks (the student table's average), in %
        return 100 * averages[src][0] / averages[src][1]

    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if len(values) == len(keys) else float("nan")

    def chunk(src, field):  # a source's chunk_smoothness field averaged over the complete tasks
        return mean([smooth.get(k, {}).get(src, {}).get(field) for k in keys])

    def at_start(src):  # trajectories whose largest action change falls on a chunk start, over all complete tasks
        rows = [smooth.get(k, {}).get(src) for k in keys]
        return f"{sum(r['largest_at_boundary'] for r in rows if r)}/{sum(r['trajectories'] for r in rows if r)}"

    def spread(src):  # a source's action std across trajectories, averaged over the complete tasks
        return mean([quality[k].get(src, {}).get("consistency_mean_std_all") for k in keys])

    teacher = {alg: pooled(f"{alg}_ppo") for alg in ("diffusion", "gaussian")}
    kept = {alg: student(f"{alg}_rl") / teacher[alg] if teacher[alg] else float("nan") for alg in teacher}
    length = {tag: mean([lengths.get(k, {}).get(tag) for k in keys]) for tag in ("diffusion_bc", "diffusion_ppo")}
    return {
        "vs_gaussian": f"teachers (final policies) {teacher['diffusion']:.1f} % diffusion vs {teacher['gaussian']:.1f} "
        f"% Gaussian; their students keep {100 * kept['diffusion']:.0f} % and {100 * kept['gaussian']:.0f} % of that "
        "success (table 1 below)",
        "vs_human": f"the diffusion teachers reach {teacher['diffusion']:.1f} %, their students "
        f"{student('diffusion_rl'):.1f} % ({100 * kept['diffusion']:.0f} % of it); the DART demos' students "
        f"{student('scripted_dart'):.1f} % (table 1)",
        "shorter": f"PPO took the diffusion policy's successful episodes from {length['diffusion_bc']:.0f} steps (BC "
        f"start, which imitates DART demos) to {length['diffusion_ppo']:.0f} (table 2), against the DART demos' "
        f"{mean([quality[k].get('scripted_dart', {}).get('length_mean') for k in keys]):.0f}",
        "smoother": f"the diffusion-RL actions change {chunk('diffusion_rl', 'ratio'):.1f}x as much at chunk starts as "
        f"within chunks, the largest change falling on a chunk start in {at_start('diffusion_rl')} trajectories (the "
        f"DART demos: {chunk('scripted_dart', 'ratio'):.1f}x; table 3)",
        "vs_gaussian_jerk": f"mean squared change at chunk starts {chunk('diffusion_rl', 'boundary'):.3f} (diffusion) "
        f"vs {chunk('gaussian_rl', 'boundary'):.3f} (Gaussian), within chunks {chunk('diffusion_rl', 'within'):.3f} "
        f"vs {chunk('gaussian_rl', 'within'):.3f} (table 3)",
        "consistency": "action std across trajectories: the clean expert's (noise-free, so the spread of the init "
        f"states alone) {spread('scripted'):.3f}, the DART demos' {spread('scripted_dart'):.3f}, diffusion RL's "
        f"{spread('diffusion_rl'):.3f}",
    }


def actions_per_chunk(run_dir: str, chunks_per_iteration: int) -> int:
    """Actions executed per chunk, as the run recorded it: env steps of its first update / its chunks."""
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        row = json.loads(line)
        if row.get("step", 0) > 0 and "env_steps" in row:
            return round(row["env_steps"] / (row["step"] * chunks_per_iteration))
    raise ValueError(f"{run_dir}/metrics.jsonl has no update row to read the chunk length from")


def overlap_paragraph(docs: str) -> list[str]:
    """Training = test: this study ran before the layout split; how far sampled layouts lie from the protocol's,
    from docs/coverage/layouts/ (scripts/layout_spread.py), when measured."""
    spreads = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(docs, "coverage", "layouts", "*.json")))]
    measured = ""
    if spreads:
        near = [s["sampled_to_nearest_protocol_cm"]["median"] for s in spreads]
        between = [s["protocol_to_nearest_protocol_cm"]["median"] for s in spreads]
        measured = (f" On the {len(spreads)} tasks of the coverage study a layout LIBERO's placement initializer "
                    f"samples lies {min(near):.1f}-{max(near):.1f} cm (median over 200 layouts per task) from its "
                    f"nearest protocol state, and the protocol states {min(between):.1f}-{max(between):.1f} cm from "
                    "one another (docs/coverage.md, the largest displacement of any object).")  # fmt: skip
    return ["**Training layouts = evaluation layouts in this study.** It ran before the layout split: every "
            "source (the DART and clean scripted demonstrations, the teachers' PPO rollouts, the trajectories they "
            "collected) started from the protocol's 50 init states, the layouts every teacher and student here is "
            "evaluated on, so its success rates are training-layout numbers. LIBERO's placement regions are narrow: "
            "objects move a few centimetres between layouts." + measured + " Measured when the split was introduced "
            "(issue #54): on LIBERO-Object 0 a state-mode BC student on 50 clean scripted demonstrations from the "
            "protocol's states scored 50/50 on them and 50/50 on 50 sampled layouts (DART: 6/50 and 7/50), so the "
            "overlap inflated little there. Studies from now on train and collect on sampled layouts and hold the "
            "protocol out (docs/coverage.md)."]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="docs/reproduction/results", help="reproduce_cpu.sh's RESULTS")
    parser.add_argument("--convergence-root", default="docs/convergence", help="convergence.sh's EXPORT")
    parser.add_argument("--study-root", default="convergence", help="the teachers' run directories, if present")
    parser.add_argument("--out", default="docs")
    parser.add_argument("--tasks", nargs="+", default=STUDY_TASKS, metavar="SUITE:ID",
                        help="the study's tasks, which the averages and claims pool (shown before their first "
                             "result); other tasks in --results are reported, marked, and not pooled")  # fmt: skip
    args = parser.parse_args()
    study = []
    for spec in args.tasks:
        suite, _, local = spec.partition(":")
        if not local.isdigit():
            sys.exit(f"error: --tasks takes suite:id pairs (e.g. libero_goal:6), not '{spec}'.")
        study.append((suite, f"{int(local):02d}"))
    import libero_env as le

    results = args.results
    found = sorted(
        {tuple(p.split(os.sep)[-2:]) for p in glob.glob(os.path.join(results, "eval", "*", "*", "task*.json"))}
    )
    tasks = {(suite, f[4:6]) for suite, f in found}
    for path in glob.glob(os.path.join(results, "budget", "*_task*.env")):  # started, maybe nothing evaluated yet
        suite, nn = os.path.basename(path)[: -len(".env")].rsplit("_task", 1)
        tasks.add((suite, nn))
    if not tasks:  # nothing to report: keep the page that is there
        sys.exit(f"error: no study results under {results}; run scripts/reproduce_cpu.sh first (or pass --results).")
    tasks = sorted(tasks | set(study))
    extra = {f"{suite}_task{nn}" for suite, nn in tasks if (suite, nn) not in study}
    lines = ["# CPU reproduction of the paper's comparison", "",
             "Generated by `python scripts/reproduction_report.py` from `bash scripts/reproduce_cpu.sh` (state mode, "
             "on this project's CPU machines). Success: of the evaluated policy (diffusion: `mean`, the trained chain "
             "without its noise after x_K, as evaluate.py runs a PPO checkpoint by default; Gaussian: its mean "
             "action), LIBERO protocol (init states 0-49 per evaluation seed), ± binomial standard error "
             "sqrt(p(1-p)/n) (at 0 or 100 %, where it vanishes, the exact one-sided 95 % bound). Each task states its "
             "budget.",
             "", *overlap_paragraph(args.out), ""]  # fmt: skip
    students, quality, smooth, lengths, weak = {}, {}, {}, {}, set()
    for suite, nn in tasks:
        task = le.resolve_task(suite, int(nn))
        key = f"{suite}_task{nn}"
        out_dir = os.path.join(args.out, "reproduction", key)
        os.makedirs(out_dir, exist_ok=True)
        lines += [f"## {suite} {int(nn)}: {task.instruction}", ""]
        if key in extra:
            lines += [f"Not one of the study's tasks (`--tasks`):{EXTRA} its results are reported here and in the "
                      "tables, not in the averages or the claims.", ""]  # fmt: skip
        b = budget(results, key)
        # a class's run is this study's teacher once the study evaluated its final policy (before that, the run found
        # may be an earlier one of the convergence study, e.g. on another machine)
        studied = [alg for alg in ("diffusion", "gaussian") if success(results, f"{alg}_ppo", suite, nn)]
        ppo_dirs = {alg: ppo_run_dir(args.study_root, args.convergence_root, alg, suite, nn)
                    for alg in ("diffusion", "gaussian")}  # fmt: skip
        if b:
            run_args = os.path.join(ppo_dirs["diffusion"], "args.json")  # the batch the teacher ran with
            iters = int(b["PPO_ITERS"])
            if os.path.exists(run_args):
                run_args = json.load(open(run_args))
                envs, chunks = run_args["num_envs"], run_args["num_steps"]
                act = actions_per_chunk(ppo_dirs["diffusion"], envs * chunks)
                batch = f"x {envs} envs x {chunks} chunks x {act} actions = {iters * envs * chunks * act:,} env steps"
            else:  # no teacher started yet: its batch is not known here
                batch = "(the batch is read from the teacher's run once it has started)"
            seeds = b["EVAL_SEEDS"].strip('"').split()
            walls = {alg: wall_hours(d) for alg, d in ppo_dirs.items() if alg in studied}
            wall = ", ".join(f"{alg} PPO {h:.1f} h" for alg, h in walls.items() if h is not None) or "not recorded"
            gargs = os.path.join(ppo_dirs["gaussian"], "args.json")  # the BC start's demos, as the baseline records
            start = "BC starts as in docs/convergence.md"
            if os.path.exists(gargs):
                gargs = json.load(open(gargs))
                source = dict(SOURCES)[gargs["demo_source"]].split(" (")[0]
                start = f"BC starts on the first {gargs['num_demos']} {source}"
            lines += [f"Budget: {b['DEMOS']} demos per source ({start}), "
                      f"{b['BC_STEPS']} BC steps, PPO {iters} iterations {batch} per policy class, evaluation "
                      f"{len(seeds)} seeds x "
                      f"{b['EVAL_EPISODES']} init states, students on {b['STUDENT_DEMOS']} trajectories. Wall time: "
                      f"{wall}. Command: `PPO_ITERS={iters} EVAL_SEEDS=\"{' '.join(seeds)}\" bash "
                      f"scripts/reproduce_cpu.sh {suite}:{int(nn)}`."]  # fmt: skip
            n = len(seeds) * int(b["EVAL_EPISODES"])
            lines += [f"Statistical power: {n} episodes per rate, standard error at most {50 / math.sqrt(n):.1f} "
                      f"points; two rates differ beyond noise (2 standard errors of the difference) only when "
                      f"they are more than {2 * math.sqrt(2) * 50 / math.sqrt(n):.0f} points apart at 50 % success "
                      f"({2 * math.sqrt(2) * 100 * math.sqrt(0.2 * 0.8 / n):.0f} at 20 %).", ""]  # fmt: skip
        # success of the BC starts and final policies
        lines += ["| policy | success % (n) |", "|---|---|"]
        for tag, label in POLICIES:
            lines.append(f"| {label} | {rate_cell(results, tag, suite, nn)} |")
            ok = [e["length"] for e in episodes(results, tag, suite, nn) if e["success"]]
            lengths.setdefault(key, {})[tag] = sum(ok) / len(ok) if ok else None
        if any(REPEATS in line for line in lines[-len(POLICIES) :]):
            lines += ["", REPEATS_NOTE]
        teacher = success(results, "diffusion_ppo", suite, nn)
        if teacher and teacher[0] / teacher[1] < TEACHER_MIN:
            weak.add(key)
            lines += ["", f"**Teacher below {100 * TEACHER_MIN:.0f} %**: diffusion PPO "
                      f"{rate_cell(results, 'diffusion_ppo', suite, nn)}; this "
                      f"task's columns in the student tables are marked{WEAK} (students of an unconverged "
                      "teacher)."]  # fmt: skip
        ppo_runs = {alg: os.path.join(d, "metrics.jsonl") for alg, d in ppo_dirs.items() if alg in studied}
        curve_png = os.path.join(out_dir, "learning_curve.png")
        if ppo_runs:
            learning_curves(ppo_runs, curve_png, f"{key}: '{task.instruction}'")
            lines += ["", f"![learning curves](reproduction/{key}/learning_curve.png)", ""]
        else:  # no teacher of this study yet: no figure (nor one left from an earlier run)
            if os.path.exists(curve_png):
                os.remove(curve_png)
            lines += ["", "Learning curves: none yet (no teacher of this task evaluated by the study).", ""]
        # data quality of the four sources (one analyze.py report per source, or one over all of them)
        metrics = source_metrics(os.path.join(results, "analysis", key))
        if metrics:
            quality[key] = metrics
            lines += ["| source | trajectories | no-op steps | avg. length | mean sq. jerk (m²/s⁶) | action std |",
                      "|---|---|---|---|---|---|"]  # fmt: skip
            for src, label in SOURCES:
                m = metrics.get(src)
                if m and "length_mean" in m:
                    kept = f"{m['successful']}" + (f" ({m['repeated']} repeated)" if m.get("repeated") else "")
                    lines.append(f"| {label} | {kept} | {m['noop_steps']} | {m['length_mean']:.1f} | "
                                 f"{m['msj_mean']:.1f} | {m['consistency_mean_std_all']:.4f} |")  # fmt: skip
                if m and "chunk_smoothness" in m:
                    smooth.setdefault(key, {})[src] = m["chunk_smoothness"]
            if any(m.get("repeated") for m in metrics.values()):
                lines += ["", "repeated: trajectories identical, action for action, to an earlier one of the same "
                          "source (a noise-free policy succeeding again from an init state it already succeeded "
                          "from); they count in every metric and in the student's data as collected."]  # fmt: skip
            quality_figure(metrics, os.path.join(out_dir, "quality.png"), f"{key}: '{task.instruction}'")
            lines += ["", f"![data quality](reproduction/{key}/quality.png)", ""]
        # students
        for src, _ in SOURCES:
            students.setdefault(src, {})[key] = success(results, f"student_{src}", suite, nn)
    # Table I in miniature
    keys = [f"{s}_task{n}" for s, n in tasks]
    complete = [k for (suite, nn), k in zip(tasks, keys) if all(success(results, t, suite, nn) for t, _ in POLICIES)
                and all(students[s].get(k) for s, _ in SOURCES) and k in quality and k not in extra]  # fmt: skip
    lines += ["## Students: the same BC recipe trained on each source (Table I in miniature)", "",
              "| training data | " + " | ".join(k + (WEAK if k in weak else "") + (EXTRA if k in extra else "")
                                                for k in keys) + " | average |",
              "|---|" + "---|" * (len(keys) + 1)]  # fmt: skip
    averages = {}
    for src, label in SOURCES:
        cells = [students.get(src, {}).get(k) for k in keys]
        done = [students[src][k] for k in complete]
        avg = (sum(c[0] for c in done), sum(c[1] for c in done)) if done else None
        averages[src] = avg
        lines.append(f"| {label} | " + " | ".join(fmt_rate(c) for c in cells) + f" | {fmt_rate(avg)} |")
    if weak:
        lines += ["", f"{WEAK.strip()}: the task's diffusion teacher is below {100 * TEACHER_MIN:.0f} % success."]
    if extra:
        lines += ["", f"{EXTRA.strip()}: not one of the study's tasks; not in the average."]

    # claims
    def rate(src):
        a = averages.get(src)
        return a[0] / a[1] if a else None

    def mean_metric(src, metric):
        vals = [quality[k][src][metric] for k in complete if metric in quality[k].get(src, {})]
        return sum(vals) / len(vals) if len(vals) == len(complete) and vals else None

    def metric_se(src, metric):
        """Standard error of mean_metric (the mean over tasks of per-task means): sqrt(sum of squared per-task
        standard errors) / tasks; per task std / sqrt(trajectories), or the consistency's jackknife."""
        ses = []
        for k in complete:
            m = quality[k].get(src, {})
            if metric == "consistency_mean_std_all":
                ses.append(m.get("consistency_se_all"))
            else:
                std = m.get(metric.replace("_mean", "_std"))
                ses.append(std / math.sqrt(m["successful"]) if std is not None and m.get("successful") else None)
        if not ses or any(x is None or x != x for x in ses):
            return None
        return math.sqrt(sum(x * x for x in ses)) / len(ses)

    def ahead(src_a, src_b) -> str:
        """On how many complete tasks the first source's student beats the second's."""
        wins = sum(students[src_a][k][0] / students[src_a][k][1] > students[src_b][k][0] / students[src_b][k][1]
                   for k in complete)  # fmt: skip
        return f"; ahead on {wins} of {len(complete)} tasks"

    def noise(diff, se) -> str:
        if se is None:
            return " (no standard error recorded)"
        return " (beyond noise)" if abs(diff) > 2 * se else " (within noise: < 2 standard errors)"

    def claim(text, a, b, lower_is_better=False, unit="", ns=None, pair=None, metric=None, why=""):
        """One row: does a beat b, by how much, is the difference beyond two standard errors, and where it does not
        hold, the measurement that bears on it (why)."""
        if a is None or b is None:
            return f"| {text} | not measured yet | | |"
        holds = a < b if lower_is_better else a > b
        verdict = "holds" if holds else "does not hold"
        why = "" if holds else why
        if ns:  # success rates over ns episodes, pooled
            se = math.sqrt(a * (1 - a) / ns[0] + b * (1 - b) / ns[1])
            return (f"| {text} | {verdict}{noise(a - b, se)} | {100 * a:.1f} % vs {100 * b:.1f} %, difference "
                    f"{100 * (a - b):+.1f} ± {100 * se:.1f} points (pooled episodes{ahead(*pair)}) | "
                    f"{why} |")  # fmt: skip
        src_a, src_b = pair
        se_a, se_b = metric_se(src_a, metric), metric_se(src_b, metric)
        se = math.sqrt(se_a**2 + se_b**2) if se_a is not None and se_b is not None else None
        diff = f", difference {a - b:+.4g}" + (f" ± {se:.2g}" if se is not None else "")
        return f"| {text} | {verdict}{noise(a - b, se)} | {a:.4g}{unit} vs {b:.4g}{unit}{diff} | {why} |"

    def metric_claim(text, src_a, src_b, metric, unit="", why=""):
        return claim(text, mean_metric(src_a, metric), mean_metric(src_b, metric), True, unit, pair=(src_a, src_b),
                     metric=metric, why=why)  # fmt: skip

    def n(src):
        return averages[src][1] if averages.get(src) else 0

    done = [t for t, k in zip(tasks, keys) if k in complete]
    why = reasons(done, results, lengths, smooth, quality, averages) if done else {}
    lines += ["", "## Claims", "",
              "| the paper's claim | here | measured (averaged over the complete tasks; ± one standard error) | "
              "where it does not hold: the measurement that bears on it |",
              "|---|---|---|---|",
              claim("diffusion-RL data trains a better student than Gaussian-RL data (Table I)", rate("diffusion_rl"),
                    rate("gaussian_rl"), ns=(n("diffusion_rl"), n("gaussian_rl")),
                    pair=("diffusion_rl", "gaussian_rl"), why=why.get("vs_gaussian", "")),
              claim("diffusion-RL data trains a better student than human data (Table I; DART stand-in)",
                    rate("diffusion_rl"), rate("scripted_dart"), ns=(n("diffusion_rl"), n("scripted_dart")),
                    pair=("diffusion_rl", "scripted_dart"), why=why.get("vs_human", "")),
              metric_claim("RL trajectories are shorter than human ones (Fig. 6a)", "diffusion_rl", "scripted_dart",
                           "length_mean", " steps", why.get("shorter", "")),
              metric_claim("RL trajectories are smoother (lower mean squared jerk, Fig. 6b)", "diffusion_rl",
                           "scripted_dart", "msj_mean", why=why.get("smoother", "")),
              metric_claim("diffusion RL is smoother than Gaussian RL (Fig. 6b)", "diffusion_rl", "gaussian_rl",
                           "msj_mean", why=why.get("vs_gaussian_jerk", "")),
              metric_claim("RL actions are more consistent across trajectories (Fig. 7)", "diffusion_rl",
                           "scripted_dart", "consistency_mean_std_all", why=why.get("consistency", ""))]  # fmt: skip
    lines += explanations(keys, results, tasks, lengths, smooth, students)
    status = (f"**Status: {len(complete)} of {len(study)} tasks complete** ({', '.join(complete) or 'none'}); a task "
              "in progress shows '–' where its study has not got yet. The averages and the claims use the complete "
              "tasks only.")  # fmt: skip
    if extra:
        status += f" Also reported, not pooled (not one of the study's tasks{EXTRA}): {', '.join(sorted(extra))}."
    lines[2:2] = [status, ""]
    with open(os.path.join(args.out, "reproduction.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {os.path.join(args.out, 'reproduction.md')} ({len(tasks)} tasks)")


if __name__ == "__main__":
    main()
