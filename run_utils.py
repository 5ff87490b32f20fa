"""run_utils.py — run plumbing shared by the training scripts: run directories, checkpoints, metrics, pre-emption.

Every training script (bc_diffusion, ppo_diffusion, ppo_gaussian, finetune_vla) must agree on these, so they
live once:

* the run-directory convention ``<run_root>/<phase>/<suite>/task<NN>__seed<S>/`` (``args.json``,
  ``metrics.jsonl``, ``checkpoints/{latest.pt, previous.pt, final.pt}``);
* checkpoints: one ``torch.save`` dict loadable with ``weights_only=True``, written atomically (temp file in the
  same directory, fsync, rename); the last good ``latest.pt`` is kept as ``previous.pt``, and a corrupt
  ``latest.pt`` falls back to it with a warning; loading checks ``format`` and the architecture;
* ``metrics.jsonl`` always (flushed per line), wandb only with ``--track``;
* pre-emption: SIGUSR1 (SLURM's ``--signal=B:USR1@...``) and SIGTERM set a flag the training loop polls; the
  script then writes ``latest.pt`` and requeues its SLURM job, which resumes with ``--resume auto``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from typing import Optional

import numpy as np
import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, corrupt, another script's, another architecture)."""


# ----------------------------------------------------------------------------------------------------------------
# Run directories
# ----------------------------------------------------------------------------------------------------------------
def task_run_dir(run_root: str, phase: str, suite: str, local_id: int, seed: int) -> str:
    return os.path.join(run_root, phase, suite, f"task{local_id:02d}__seed{seed}")


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------
def save_checkpoint(path: str, ckpt: dict, keep_previous: bool = False) -> None:
    """Atomic ``torch.save``: temp file in the same directory, fsync, rename. With ``keep_previous`` the file
    being replaced becomes ``previous.pt`` first (a fallback if the new one is ever damaged)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    if keep_previous and os.path.exists(path):
        os.replace(path, os.path.join(directory, "previous.pt"))
    os.replace(tmp, path)


def load_checkpoint(path: str, formats: tuple[str, ...], map_location="cpu") -> dict:
    """Load a checkpoint written by one of ``formats`` (e.g. ``("bc_diffusion/v1",)``).

    A ``latest.pt`` that cannot be read falls back to ``previous.pt`` beside it, with a warning.
    """
    if not os.path.exists(path):
        raise CheckpointError(f"Checkpoint {path} does not exist; train that phase first or pass the right path.")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated or corrupt file
        previous = os.path.join(os.path.dirname(path), "previous.pt")
        if os.path.basename(path) == "latest.pt" and os.path.exists(previous):
            warnings.warn(f"{path} is unreadable ({type(e).__name__}); falling back to {previous}.", stacklevel=2)
            return load_checkpoint(previous, formats, map_location)
        raise CheckpointError(f"Checkpoint {path} is unreadable ({type(e).__name__}); delete it.") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") not in formats:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} has format '{found}', expected one of {list(formats)}.")
    return ckpt


def check_same_architecture(path: str, saved: dict, current: dict) -> None:
    """Refuse a checkpoint whose architecture fields differ from the current ones, naming every difference."""
    keys = sorted(set(saved) | set(current))
    diff = [
        f"{k}: checkpoint {saved.get(k)!r} vs requested {current.get(k)!r}"
        for k in keys
        if saved.get(k) != current.get(k)
    ]
    if diff:
        raise CheckpointError(f"{path} was trained with another architecture ({'; '.join(diff)}).")


def resume_path(resume: str, ckpt_dir: str) -> Optional[str]:
    """``--resume``: 'auto' -> latest.pt (or previous.pt) when present, 'never' -> None, else the given path."""
    if resume == "never":
        return None
    if resume == "auto":
        for name in ("latest.pt", "previous.pt"):
            if os.path.exists(os.path.join(ckpt_dir, name)):
                return os.path.join(ckpt_dir, name)
        return None
    if not os.path.exists(resume):
        raise CheckpointError(f"--resume {resume} does not exist; pass 'auto', 'never' or an existing checkpoint.")
    return resume


# ----------------------------------------------------------------------------------------------------------------
# Random state
# ----------------------------------------------------------------------------------------------------------------
def seed_everything(seed: int, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def rng_state() -> dict:
    """Every random stream a training script draws from, as tensors (``weights_only``-loadable)."""
    state = {
        "python": torch.tensor(list(random.getstate()[1]), dtype=torch.int64),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": torch.tensor(np.random.get_state()[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((3, tuple(int(x) for x in state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(state["numpy_pos"]), 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------
class MetricsLogger:
    """Appends one JSON object per call to ``metrics.jsonl`` (flushed); mirrors to wandb with ``--track``."""

    def __init__(self, run_dir: str, config: dict, track: bool = False, project: str = "", entity=None, name=""):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._file = open(self.path, "a")
        self._wandb = None
        if track:
            import wandb

            self._wandb = wandb.init(
                project=project,
                entity=entity,
                name=f"{name}__{int(time.time())}",
                config=config,
                dir=run_dir,
                resume="allow",
            )

    def log(self, step: int, **metrics) -> None:
        row = {"step": int(step), "time": round(time.time(), 3)}
        row.update(
            {k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v) for k, v in metrics.items()}
        )
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=int(step))

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------------------------
# Pre-emption
# ----------------------------------------------------------------------------------------------------------------
class Preemption:
    """SIGUSR1 / SIGTERM set ``requested``; the training loop checkpoints, then calls :meth:`exit`."""

    def __init__(self):
        self.requested, self.signal_name = False, ""
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):  # noqa: ARG002
        self.requested, self.signal_name = True, signal.Signals(signum).name

    def exit(self, requeue: bool = True) -> None:
        """Requeue the SLURM job this runs in (if any; one process of a multi-process job), then leave."""
        job = None
        if requeue:  # an array element is requeued by its own id, not the array's
            array = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ.get("SLURM_JOB_ID")
        if job:
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            print(
                f"pre-empted ({self.signal_name}): checkpoint written, requeued {job} "
                f"({'ok' if result.returncode == 0 else result.stderr.strip()})",
                flush=True,
            )
        else:
            print(f"pre-empted ({self.signal_name}): checkpoint written; rerun with --resume auto", flush=True)
        sys.exit(0 if (job or not requeue) else 143)


# ----------------------------------------------------------------------------------------------------------------
# Training helpers
# ----------------------------------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of the weights with Diffusion Policy's warm-up: decay = 1 - (1 + step)^-power."""

    def __init__(self, model: torch.nn.Module, power: float, max_decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.power, self.max_decay = power, max_decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> float:
        decay = min(self.max_decay, max(0.0, 1 - (1 + step) ** -self.power))
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1 - decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)
        return decay


def cosine_with_warmup(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
