"""Learning curve of a PPO run from its metrics.jsonl: eval success (its --eval-mode) and rollout success vs env steps.

    python scripts/plot_learning_curve.py runs/ppo_diffusion/libero_object/task00__seed0 docs/ppo_learning_curve.png \
        --title "..."
"""

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("out_png")
    parser.add_argument("--title", default="")
    parser.add_argument("--smooth", type=int, default=20, help="iterations in the rollout-success running mean")
    args = parser.parse_args()
    rows = read_metrics(args.run_dir)
    evals = [(r["env_steps"], r["eval/success_rate"]) for r in rows if "eval/success_rate" in r]
    train = [
        (r["env_steps"], r["train_success_rate"])
        for r in rows
        if r.get("train_success_rate") == r.get("train_success_rate") and "train_success_rate" in r
    ]  # fmt: skip  (NaN: no episode ended)
    if not evals:
        raise SystemExit(f"error: {args.run_dir}/metrics.jsonl has no eval/success_rate yet; wait for an evaluation.")
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if train:
        steps, rates = zip(*train)
        ax.plot(steps, rates, color="0.8", lw=0.8, label="rollout success per iteration (stochastic, eta = 1)")
        w = min(args.smooth, len(rates))
        windows = [rates[max(0, i - w + 1) : i + 1] for i in range(len(rates))]
        smooth = [sum(win) / len(win) for win in windows]
        ax.plot(steps, smooth, color="C1", lw=1.5, label=f"rollout success, mean of last {w} iterations")
    ax.plot(*zip(*evals), "o-", color="C0", label="eval success (the run's --eval-mode, 50 init states)")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    if args.title:
        ax.set_title(args.title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out_png)), exist_ok=True)
    fig.savefig(args.out_png, dpi=120)
    print(f"wrote {args.out_png}: {len(evals)} evaluations, last {evals[-1][1]:.2f} at {evals[-1][0]} env steps")


if __name__ == "__main__":
    main()
