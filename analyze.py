"""analyze.py — data quality of trajectory datasets (the paper's Section V), with figures.

For every task and data source:

* no-op steps (OpenVLA's rule, demo_hdf5.noop_mask: ||a[:6]|| < 1e-4 and the gripper command unchanged from the
  previous kept step), counted over all trajectories;
* trajectory length of the successful trajectories (mean, median, std);
* mean squared jerk of the end-effector path: the third finite difference of ``obs/ee_pos`` at dt = 1/20 s,
  j_t = (x_{t+3} - 3 x_{t+2} + 3 x_{t+1} - x_t) / dt^3, squared norm averaged over the trajectory, then over
  trajectories;
* action consistency: per-timestep mean and std of each action axis across a task's successful trajectories
  (aligned by step index; ``count`` says how many are still running), summarised as the mean std over the steps
  where at least two trajectories run;
* smoothness within vs across action chunks: the mean squared change of the arm action (6 dims) from step t-1 to t
  at steps that start an 8-action chunk (t % 8 == 0, where a chunked policy re-plans) and inside chunks, over all
  trajectories, and how many trajectories have their largest change at a chunk start (1 in 8 by chance). A ratio
  >> 1 says the jerk comes from re-planning; for sources that act every step the grid is arbitrary.

Outputs in ``results/analysis/<report_name>/``: ``metrics.json`` (per task, per suite and overall; the
per-timestep curves of the figure task), ``report.md``, ``fig6a_length.png``, ``fig6b_jerk.png``,
``fig7_consistency.png``.

    python analyze.py --sources human scripted diffusion_rl gaussian_rl --suite libero_90
    python analyze.py --data human="data/human/libero_90/*.hdf5" rl="runs/x/*.hdf5" --report-name mine
"""

from __future__ import annotations

import glob
import os
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import tyro

import demo_hdf5
import libero_env as le


@dataclass
class Args:
    sources: tuple[str, ...] = ("human", "scripted", "diffusion_rl", "gaussian_rl")
    """data sources by the convention data/<source>/<suite>/<task_name>_demo.hdf5 (missing ones are reported)"""
    data: tuple[str, ...] = ()
    """explicit name=glob pairs (replace --sources), e.g. human='data/human/libero_90/*.hdf5'"""
    suite: str = "all"
    """only files of this suite (all: every suite)"""
    data_root: str = "data"
    """root of the data convention"""
    results_root: str = "results"
    """outputs go to results/analysis/<report_name>/"""
    report_name: Optional[str] = None
    """report directory name (default: the sources joined by '_vs_')"""
    figure_task: str = "put the black bowl on top of the cabinet"
    """instruction (or task name) of the Fig. 7 task; falls back to the first task every source has"""
    figure_axis: int = 1
    """action axis of Fig. 7 (0-2 position x/y/z, 3-5 rotation, 6 gripper)"""
    dt: float = 1.0 / le.CONTROL_HZ
    """control period for the jerk (s)"""
    figures: bool = True
    """draw the figures (--no-figures: metrics.json and report.md only, e.g. one source of a study whose own report
    draws the comparison)"""


AXES = ["x", "y", "z", "roll", "pitch", "yaw", "gripper"]


# ================================================================================================================
# Metrics (pure functions; tests check them against known answers)
# ================================================================================================================
def mean_squared_jerk(positions: np.ndarray, dt: float) -> float:
    """Mean over t of ||third finite difference / dt^3||^2 of a (T, 3) path; NaN for T < 4."""
    if len(positions) < 4:
        return float("nan")
    jerk = np.diff(np.asarray(positions, dtype=np.float64), n=3, axis=0) / dt**3
    return float(np.mean(np.sum(jerk**2, axis=1)))


def action_consistency(trajectories: list[np.ndarray]) -> dict:
    """Per-timestep mean/std of each axis across trajectories aligned by step index.

    Returns mean (T, D), std (T, D), count (T,) and ``mean_std`` (D,): the std averaged over the steps where at
    least two trajectories run.
    """
    T = max(len(a) for a in trajectories)
    D = trajectories[0].shape[1]
    stacked = np.full((len(trajectories), T, D), np.nan)
    for i, a in enumerate(trajectories):
        stacked[i, : len(a)] = a
    count = np.sum(~np.isnan(stacked[:, :, 0]), axis=0)
    with np.errstate(invalid="ignore"):
        mean = np.nanmean(stacked, axis=0)
        std = np.nanstd(stacked, axis=0)  # population std over the trajectories present at each step
    valid = count >= 2
    mean_std = std[valid].mean(0) if valid.any() else np.full(D, np.nan)
    return {"mean": mean, "std": std, "count": count, "mean_std": mean_std}


def consistency_se(trajectories: list[np.ndarray]) -> float:
    """Jackknife standard error of the all-axes consistency (``mean_std`` averaged over axes): leave each trajectory
    out once, sqrt((n - 1) / n * sum((theta_i - mean theta_i)^2)); NaN under three trajectories."""
    n = len(trajectories)
    if n < 3:
        return float("nan")
    loo = np.array([np.nanmean(action_consistency(trajectories[:i] + trajectories[i + 1 :])["mean_std"])
                    for i in range(n)])  # fmt: skip
    return float(np.sqrt((n - 1) / n * np.sum((loo - loo.mean()) ** 2)))


def chunk_smoothness(trajectories: list[np.ndarray], chunk: int = 8) -> dict:
    """Mean squared change of the arm action (first 6 dims) at chunk starts (t % chunk == 0) and inside chunks, their
    ratio, and the trajectories whose largest change falls on a chunk start (of those with at least two steps)."""
    at, inside, largest = [], [], 0
    usable = [np.asarray(a, dtype=np.float64)[:, :6] for a in trajectories if len(a) >= 2]
    for a in usable:
        d = np.sum(np.diff(a, axis=0) ** 2, axis=1)  # d[i]: the change into step t = i + 1
        t = np.arange(1, len(a))
        at.append(d[t % chunk == 0])
        inside.append(d[t % chunk != 0])
        largest += int(t[np.argmax(d)] % chunk == 0)
    at, inside = np.concatenate([np.empty(0), *at]), np.concatenate([np.empty(0), *inside])
    boundary = float(at.mean()) if at.size else float("nan")
    within = float(inside.mean()) if inside.size else float("nan")
    ratio = boundary / within if within > 0 else float("nan")
    return {"boundary": boundary, "within": within, "ratio": ratio, "largest_at_boundary": largest,
            "trajectories": len(usable)}  # fmt: skip


def demo_success(f: demo_hdf5.DemoFile, key: str, data: dict) -> bool:
    attrs = f.demo_attrs(key)
    if "success" in attrs:
        return bool(attrs["success"])
    return bool(len(data.get("dones", [])) and data["dones"][-1])  # LIBERO's files: done marked at the last step


def task_metrics(paths: list[str], dt: float) -> dict:
    """Metrics of one task from one or more files of one source."""
    noops = steps = n_traj = repeated = 0
    lengths, jerks, actions, every, instruction, seen = [], [], [], [], "", set()
    for path in paths:
        with demo_hdf5.DemoFile(path) as f:
            instruction = f.instruction
            for key in f.demo_keys:
                d = f.read(key, ["ee_pos"])
                n_traj += 1
                steps += len(d["actions"])
                noops += int(demo_hdf5.noop_mask(d["actions"]).sum())
                every.append(d["actions"])
                if demo_success(f, key, d):
                    lengths.append(len(d["actions"]))
                    jerks.append(mean_squared_jerk(d["obs"]["ee_pos"], dt))
                    actions.append(np.asarray(d["actions"], dtype=np.float64))
                    # a noise-free policy (the Gaussian's mean) replays an init state's trajectory action for action
                    fingerprint = actions[-1].tobytes()
                    repeated += fingerprint in seen
                    seen.add(fingerprint)
    out = {
        "instruction": instruction,
        "files": paths,
        "trajectories": n_traj,
        "successful": len(lengths),
        "repeated": repeated,  # successful trajectories whose actions repeat an earlier one's exactly
        "steps": steps,
        "noop_steps": noops,
        "noop_fraction": noops / steps if steps else float("nan"),
        "chunk_smoothness": chunk_smoothness(every),
    }
    if lengths:
        cons = action_consistency(actions)
        out.update(
            length_mean=float(np.mean(lengths)),
            length_median=float(np.median(lengths)),
            length_std=float(np.std(lengths)),
            msj_mean=float(np.nanmean(jerks)),
            msj_std=float(np.nanstd(jerks)),
            consistency_mean_std={a: float(v) for a, v in zip(AXES, cons["mean_std"])},
            consistency_mean_std_all=float(np.nanmean(cons["mean_std"])),
            consistency_se_all=consistency_se(actions),
        )
        out["_curves"] = cons
    return out


# ================================================================================================================
# Discovery and aggregation
# ================================================================================================================
def file_suite(path: str) -> str:
    parent = os.path.basename(os.path.dirname(path))
    if parent in le.SUITES:
        return parent
    with demo_hdf5.DemoFile(path) as f:
        return str(f.attrs.get("suite", "unknown"))


def discover(args: Args) -> dict:
    """source -> task name -> list of files (only files of --suite)."""
    pairs = (
        [spec.split("=", 1) for spec in args.data]
        if args.data
        else [
            (s, os.path.join(args.data_root, s, "*" if args.suite == "all" else args.suite, "*_demo.hdf5"))
            for s in args.sources
        ]
    )
    out = {}
    for name, pattern in pairs:
        files = sorted(glob.glob(pattern, recursive=True))
        if args.suite != "all":
            files = [p for p in files if file_suite(p) == args.suite]
        tasks = {}
        for p in files:
            tasks.setdefault(os.path.basename(p)[: -len("_demo.hdf5")], []).append(p)
        out[name] = tasks
    return out


def aggregate(per_task: dict, suites: dict) -> dict:
    """Per source: per suite and overall averages of the per-task metrics (tasks weigh equally)."""
    out = {}
    sources = sorted({s for t in per_task.values() for s in t})
    for src in sources:
        rows = {name: m[src] for name, m in per_task.items() if src in m}
        groups = {"overall": list(rows)}
        for name in rows:
            groups.setdefault(suites[name], []).append(name)
        out[src] = {}
        for group, names in groups.items():
            ms = [rows[n] for n in names]
            ok = [m for m in ms if m["successful"]]
            out[src][group] = {
                "tasks": len(ms),
                "trajectories": sum(m["trajectories"] for m in ms),
                "noop_steps": sum(m["noop_steps"] for m in ms),
                "steps": sum(m["steps"] for m in ms),
                "length_mean": float(np.mean([m["length_mean"] for m in ok])) if ok else None,
                "msj_mean": float(np.mean([m["msj_mean"] for m in ok])) if ok else None,
                "consistency_mean_std": float(np.nanmean([m["consistency_mean_std_all"] for m in ok])) if ok else None,
            }
    return out


# ================================================================================================================
# Figures
# ================================================================================================================
def bar_figure(path: str, agg: dict, key: str, ylabel: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = list(agg)
    groups = [g for g in [*le.SUITES, "overall"] if any(g in agg[s] for s in sources)]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(groups), 3.6), dpi=120)
    width = 0.8 / max(1, len(sources))
    for i, src in enumerate(sources):
        vals = [agg[src].get(g, {}).get(key) or 0.0 for g in groups]
        ax.bar(np.arange(len(groups)) + i * width, vals, width, label=src)
    ax.set_xticks(np.arange(len(groups)) + width * (len(sources) - 1) / 2, groups, rotation=15)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def consistency_figure(path: str, curves: dict, axis: int, instruction: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=120)
    for src, c in curves.items():
        t = np.arange(len(c["mean"]))
        keep = c["count"] >= 2
        m, s = c["mean"][:, axis], c["std"][:, axis]
        ax.plot(t[keep], m[keep], label=f"{src} (n={int(c['count'][0])})")
        ax.fill_between(t[keep], (m - s)[keep], (m + s)[keep], alpha=0.25)
    ax.set_xlabel("step")
    ax.set_ylabel(f"action {AXES[axis]} (mean ± std)")
    ax.set_title(f"Action consistency: '{instruction}'", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def fmt(x, digits=1) -> str:
    return "—" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


def report_markdown(args: Args, agg: dict, per_task: dict, missing: dict, figure_task: Optional[str]) -> str:
    lines = [
        f"# Data quality: {', '.join(agg)}",
        "",
        f"Suite filter: `{args.suite}`. Generated by `analyze.py`.",
        "",
        "| source | group | tasks | trajectories | no-op steps | avg. length | mean sq. jerk (m²/s⁶) | "
        "action std (mean over steps, axes) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for src, groups in agg.items():
        for group, g in groups.items():
            lines.append(
                f"| {src} | {group} | {g['tasks']} | {g['trajectories']} | {g['noop_steps']} / {g['steps']} | "
                f"{fmt(g['length_mean'])} | {fmt(g['msj_mean'], 2)} | {fmt(g['consistency_mean_std'], 4)} |"
            )
    lines += [
        "",
        "## Per task",
        "",
        "| task | source | trajectories | no-ops | length (mean / median / std) | MSJ | action std |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in sorted(per_task):
        for src, m in per_task[name].items():
            length = f"{fmt(m.get('length_mean'))} / {fmt(m.get('length_median'))} / {fmt(m.get('length_std'))}"
            lines.append(
                f"| {name} | {src} | {m['trajectories']} | {m['noop_steps']} | {length} | "
                f"{fmt(m.get('msj_mean'), 2)} | {fmt(m.get('consistency_mean_std_all'), 4)} |"
            )
    if any(missing.values()):
        lines += ["", "## Missing", ""]
        for src, names in missing.items():
            if names:
                lines.append(f"- `{src}` lacks {len(names)} task(s) the others have: {', '.join(sorted(names))}")
    if not args.figures:
        return "\n".join(lines)
    lines += ["", "## Figures", "", "![Fig. 6a](fig6a_length.png)", "", "![Fig. 6b](fig6b_jerk.png)", ""]
    if figure_task:
        lines += [f"![Fig. 7](fig7_consistency.png) — `{figure_task}`, axis `{AXES[args.figure_axis]}`", ""]
    return "\n".join(lines)


def choose_figure_task(args: Args, per_task: dict) -> Optional[str]:
    everywhere = [
        n for n, m in per_task.items() if all(s in m and m[s]["successful"] for s in per_task_sources(per_task))
    ]
    wanted = " ".join(args.figure_task.lower().split())
    for name in sorted(per_task):
        m = next(iter(per_task[name].values()))
        if wanted in (name.lower(), " ".join(m["instruction"].lower().split())) and name in everywhere:
            return name
    return sorted(everywhere)[0] if everywhere else None


def per_task_sources(per_task: dict) -> list[str]:
    return sorted({s for m in per_task.values() for s in m})


# ================================================================================================================
if __name__ == "__main__":
    import run_utils

    args = tyro.cli(Args)
    try:
        le.check_task_args(args.suite, None)
        if not 0 <= args.figure_axis < len(AXES):
            raise ValueError(f"--figure-axis must be 0-{len(AXES) - 1}.")
        found = discover(args)
    except (ValueError, demo_hdf5.TrajectoryFileError) as e:
        sys.exit(f"error: {e}")
    empty = [s for s, tasks in found.items() if not tasks]
    for s in empty:
        print(f"source '{s}': no files found (skipped)")
    found = {s: t for s, t in found.items() if t}
    if not found:
        sys.exit("error: none of the sources has trajectory files; collect data or check --data-root/--data.")
    per_task, suites = {}, {}
    try:  # a corrupt or foreign file stops the run with the reader's one-sentence error, before anything is written
        for src, tasks in found.items():
            for name, paths in tasks.items():
                print(f"{src}: {name} ({len(paths)} file(s))")
                per_task.setdefault(name, {})[src] = task_metrics(paths, args.dt)
                suites[name] = file_suite(paths[0])
    except demo_hdf5.TrajectoryFileError as e:
        sys.exit(f"error: {e}")
    union = set(per_task)
    missing = {s: sorted(union - set(t)) for s, t in found.items()}
    agg = aggregate(per_task, suites)
    name = args.report_name or "_vs_".join(found)
    out_dir = os.path.join(args.results_root, "analysis", name)
    os.makedirs(out_dir, exist_ok=True)
    figure_task = choose_figure_task(args, per_task)
    if args.figures:
        bar_figure(
            os.path.join(out_dir, "fig6a_length.png"),
            agg,
            "length_mean",
            "steps",
            "Average successful trajectory length",
        )
        bar_figure(
            os.path.join(out_dir, "fig6b_jerk.png"), agg, "msj_mean", "m²/s⁶", "Mean squared jerk of the end effector"
        )
    curves = {}
    if figure_task:
        curves = {s: m["_curves"] for s, m in per_task[figure_task].items()}
        instruction = next(iter(per_task[figure_task].values()))["instruction"]
        if args.figures:
            consistency_figure(os.path.join(out_dir, "fig7_consistency.png"), curves, args.figure_axis, instruction)
    metrics = {
        "sources": {s: sorted(t) for s, t in found.items()},
        "missing": missing,
        "suites": suites,
        "per_task": {
            n: {s: {k: v for k, v in m.items() if k != "_curves"} for s, m in ms.items()} for n, ms in per_task.items()
        },
        "aggregate": agg,
        "figure_task": figure_task,
        "figure_axis": AXES[args.figure_axis],
        "figure_curves": {s: {k: np.asarray(v).tolist() for k, v in c.items()} for s, c in curves.items()},
    }
    run_utils.write_json(os.path.join(out_dir, "metrics.json"), metrics)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(report_markdown(args, agg, per_task, missing, figure_task))
    figures = ""
    if args.figures:
        figures = ", fig6a_length.png, fig6b_jerk.png"
        figures += ", fig7_consistency.png" if figure_task else "; no task common to all sources for Fig. 7"
    print(f"report: {out_dir}/report.md (metrics.json{figures})")
