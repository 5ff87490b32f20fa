"""demo_hdf5.py — the trajectory file format every phase agrees on.

One HDF5 file per task, in LIBERO's layout so that LIBERO's own human demos load unchanged::

    data/                                   group; its attributes describe the file:
        problem_info (JSON: language_instruction, problem_name, domain_name; ours add benchmark_instruction),
        env_args (JSON), bddl_file_name,
        total (samples), num_demos; files written here add obs_alignment="pre_action", source, image_size,
        checkpoint, suite, task_name and the collection statistics.
      demo_<k>/                             attributes num_samples; ours add init_state_index, seed, success
        actions (T, 7)  states (T, D)  robot_states (T, 9)  rewards (T,)  dones (T,)
        obs/agentview_rgb (T, H, W, 3) uint8   obs/eye_in_hand_rgb   (raw renders: upside down)
        obs/ee_states (T, 6)  obs/ee_pos (T, 3)  obs/ee_ori (T, 3)  obs/gripper_states (T, 2)
        obs/joint_states (T, 7)  obs/object_state (T, D_obj)   (object_state: ours only)

Alignment. In our files observation t is the one action t was chosen from (``obs_alignment="pre_action"``).
LIBERO's original files record observation t *after* action t (while ``states[t]`` is the state before it),
so the reader re-aligns them: sample t pairs ``obs[t-1]`` with ``actions[t]``, dropping the first action, whose
pre-action observation was never stored.

Instructions. ``language_instruction`` is the BDDL ``:language`` text, as in LIBERO's files ("Pick the bbq sauce
and place it in the basket"); ours also store LIBERO's file-name-derived ``task.language`` ("pick up the bbq sauce
and place it in the basket"), the text OpenVLA, openpi and LeRobot prompt with, as ``benchmark_instruction``. For
LIBERO's files the reader derives it from the task name with LIBERO's rule (:func:`benchmark_language`).

Writers write ``<name>.partial`` beside the final file, flush after every demo and rename on commit, so a killed
job never leaves a partial file under the final name and a rerun can continue from the ``.partial``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Optional

import h5py
import numpy as np

OBS_ALIGNMENT = "pre_action"
SOURCES = ("human", "scripted", "diffusion_rl", "gaussian_rl", "vla")
LOWDIM_OBS_KEYS = ("ee_states", "ee_pos", "ee_ori", "gripper_states", "joint_states", "object_state")
IMAGE_KEYS = ("agentview_rgb", "eye_in_hand_rgb")
NOOP_THRESHOLD = 1e-4


class TrajectoryFileError(ValueError):
    """A file that is missing, truncated, or not a trajectory file."""


def demo_path(data_root: str, source: str, suite: str, task_name: str) -> str:
    """The path convention of DESIGN.md: ``<data_root>/<source>/<suite>/<task_name>_demo.hdf5``."""
    return os.path.join(data_root, source, suite, f"{task_name}_demo.hdf5")


def _demo_index(key: str) -> int:
    match = re.fullmatch(r"demo_(\d+)", key)
    return int(match.group(1)) if match else -1


# ----------------------------------------------------------------------------------------------------------------
# No-op rule (OpenVLA's regenerated LIBERO data; analyze.py counts, finetune_vla.py filters)
# ----------------------------------------------------------------------------------------------------------------
def noop_mask(actions: np.ndarray, threshold: float = NOOP_THRESHOLD) -> np.ndarray:
    """True where a step is a no-op: ``‖a[:6]‖ < threshold`` and the gripper command equals that of the
    previous *kept* step (the first step is judged on its motion alone)."""
    actions = np.asarray(actions)
    mask = np.zeros(len(actions), dtype=bool)
    prev_gripper = None
    for t, a in enumerate(actions):
        still = np.linalg.norm(a[:6]) < threshold
        if still and (prev_gripper is None or a[6] == prev_gripper):
            mask[t] = True
        else:
            prev_gripper = a[6]
    return mask


# ----------------------------------------------------------------------------------------------------------------
# Reader
# ----------------------------------------------------------------------------------------------------------------
class DemoFile:
    """Read-only view of one trajectory file (ours or LIBERO's), with observations aligned to actions.

    >>> with DemoFile(path) as f:
    ...     demo = f.read(f.demo_keys[0])          # dict: actions, states, rewards, dones, obs/<key>, ...
    """

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise TrajectoryFileError(f"{path} does not exist; collect it with collect.py or check --data-root.")
        try:
            self._f = h5py.File(path, "r")
        except OSError as e:
            raise TrajectoryFileError(
                f"{path} is truncated or not an HDF5 file ({e}); delete it and collect it again."
            ) from None
        try:
            self._validate()
        except Exception:
            self._f.close()
            raise

    def _validate(self) -> None:
        data = self._f.get("data")
        if not isinstance(data, h5py.Group) or "problem_info" not in data.attrs:
            raise TrajectoryFileError(
                f"{self.path} is not a trajectory file (no 'data' group with a 'problem_info' attribute); "
                "pass a *_demo.hdf5 written by collect.py or released by LIBERO."
            )
        self.demo_keys = sorted((k for k in data if _demo_index(k) >= 0), key=_demo_index)
        if not self.demo_keys:
            raise TrajectoryFileError(f"{self.path} holds no demo_<k> groups; it is empty or not a trajectory file.")
        self.attrs = dict(data.attrs)
        self.aligned = self.attrs.get("obs_alignment") == OBS_ALIGNMENT
        self.problem_info = json.loads(self.attrs["problem_info"])
        self.instruction = " ".join(str(self.problem_info.get("language_instruction", "")).split())
        self.task_name = str(self.attrs.get("task_name", os.path.basename(self.path).removesuffix("_demo.hdf5")))
        self.benchmark_instruction = self.problem_info.get("benchmark_instruction") or benchmark_language(
            self.task_name
        )
        self.source = str(self.attrs.get("source", "human"))
        for key in self.demo_keys:
            group = data[key]
            missing = [k for k in ("actions", "obs") if k not in group]
            if missing:
                raise TrajectoryFileError(f"{self.path}: {key} lacks {missing}; the file is incomplete or foreign.")
            try:
                group["actions"].shape  # noqa: B018 - touching the dataset header detects truncation
            except OSError as e:
                raise TrajectoryFileError(f"{self.path}: {key} is unreadable ({e}); the file is truncated.") from None

    # -- access --------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.demo_keys)

    def obs_keys(self, demo_key: Optional[str] = None) -> list[str]:
        return list(self._f["data"][demo_key or self.demo_keys[0]]["obs"].keys())

    def num_samples(self, demo_key: str) -> int:
        """Aligned length: one less than stored for LIBERO's original files."""
        n = self._f["data"][demo_key]["actions"].shape[0]
        return n if self.aligned else n - 1

    def demo_attrs(self, demo_key: str) -> dict:
        return dict(self._f["data"][demo_key].attrs)

    def read(
        self,
        demo_key: str,
        obs_keys: Optional[Iterable[str]] = None,
        start: int = 0,
        stop: Optional[int] = None,
    ) -> dict:
        """Aligned arrays of one demo (optionally samples ``start:stop``): ``actions, states, robot_states,
        rewards, dones`` and ``obs`` (dict; ``obs_keys`` selects, default all)."""
        group = self._f["data"][demo_key]
        n = self.num_samples(demo_key)
        stop = n if stop is None else min(stop, n)
        # sample t: actions/states/rewards/dones at stored index t + shift, observations at stored index t
        shift = 0 if self.aligned else 1
        act_sl, obs_sl = slice(start + shift, stop + shift), slice(start, stop)
        out = {}
        try:
            for key in ("actions", "states", "rewards", "dones"):
                if key in group:
                    out[key] = group[key][act_sl]
            if "robot_states" in group:  # recorded with the observation
                out["robot_states"] = group["robot_states"][obs_sl]
            keys = group["obs"].keys() if obs_keys is None else obs_keys
            out["obs"] = {}
            for key in keys:
                if key not in group["obs"]:
                    raise TrajectoryFileError(
                        f"{self.path}: {demo_key} has no obs/{key} (it has {sorted(group['obs'].keys())})."
                    )
                out["obs"][key] = group["obs"][key][obs_sl]
        except OSError as e:
            raise TrajectoryFileError(f"{self.path}: reading {demo_key} failed ({e}); the file is truncated.") from None
        return out

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------------------------------------------
# Writer
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class FileInfo:
    """What a trajectory file says about itself (the ``data`` group attributes)."""

    instruction: str  # the BDDL :language
    problem_name: str
    bddl_file_name: str
    source: str
    suite: str
    task_name: str
    image_size: int
    checkpoint: str = ""
    benchmark_instruction: str = ""  # LIBERO's task.language
    domain_name: str = "robosuite"
    env_kwargs: Optional[dict] = None

    def attrs(self) -> dict:
        env_args = {
            "type": 1,
            "env_name": self.problem_name,
            "problem_name": self.problem_name,
            "bddl_file": self.bddl_file_name,
            "env_kwargs": self.env_kwargs or {},
        }
        problem = {
            "problem_name": self.problem_name,
            "domain_name": self.domain_name,
            "language_instruction": self.instruction,
            "benchmark_instruction": self.benchmark_instruction or benchmark_language(self.task_name),
        }
        return {
            "problem_info": json.dumps(problem),
            "env_args": json.dumps(env_args),
            "bddl_file_name": self.bddl_file_name,
            "obs_alignment": OBS_ALIGNMENT,
            "source": self.source,
            "suite": self.suite,
            "task_name": self.task_name,
            "image_size": self.image_size,
            "checkpoint": self.checkpoint,
            "macros_image_convention": "opengl",
        }


class DemoWriter:
    """Atomic, resumable writer of one trajectory file.

    Demos go to ``<path>.partial`` (flushed after each), and :meth:`commit` renames it to ``<path>``. With
    ``resume=True`` an existing readable ``.partial`` from a killed run is continued (``resumed_demos`` says how
    many demos it held); an unreadable one is discarded and the file started clean.
    """

    def __init__(self, path: str, info: FileInfo, resume: bool = True, image_compression: Optional[str] = "gzip"):
        self.path, self.partial = path, path + ".partial"
        self.info, self.image_compression = info, image_compression
        self.resumed_demos, self.discarded_partial = 0, False
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if resume and os.path.exists(self.partial):
            try:
                self._f = h5py.File(self.partial, "a")
                complete = [k for k in self._f["data"] if self._f["data"][k].attrs.get("complete", False)]
                for k in list(self._f["data"]):
                    if k not in complete:  # a demo cut short by the kill
                        del self._f["data"][k]
                self.resumed_demos = len(complete)
            except Exception:  # noqa: BLE001 - any damage means start clean
                if getattr(self, "_f", None) is not None and self._f.id.valid:
                    self._f.close()
                self.discarded_partial = True
                os.remove(self.partial)
        elif os.path.exists(self.partial):
            os.remove(self.partial)
        if self.resumed_demos == 0:
            if getattr(self, "_f", None) is not None and self._f.id.valid:
                self._f.close()
            self._f = h5py.File(self.partial, "w")
            self._f.create_group("data")
        for key, value in info.attrs().items():
            self._f["data"].attrs[key] = value
        self._f.flush()

    def set_attrs(self, **attrs) -> None:
        """Update file attributes of the ``.partial`` (progress counters a resumed run reads back)."""
        for key, value in attrs.items():
            self._f["data"].attrs[key] = value

    @property
    def file_attrs(self) -> dict:
        return dict(self._f["data"].attrs)

    @property
    def num_demos(self) -> int:
        return sum(1 for k in self._f["data"] if _demo_index(k) >= 0)

    def existing_demo_attrs(self) -> list[dict]:
        return [dict(self._f["data"][k].attrs) for k in sorted(self._f["data"], key=_demo_index)]

    def add_demo(
        self,
        actions: np.ndarray,
        obs: dict,
        states: np.ndarray,
        robot_states: np.ndarray,
        rewards: np.ndarray,
        dones: np.ndarray,
        attrs: Optional[dict] = None,
    ) -> str:
        """Append one trajectory (arrays of equal length T; ``obs`` maps obs key -> (T, ...))."""
        T = len(actions)
        for name, arr in [
            ("states", states),
            ("robot_states", robot_states),
            ("rewards", rewards),
            ("dones", dones),
            *[(f"obs/{k}", v) for k, v in obs.items()],
        ]:
            if len(arr) != T:
                raise ValueError(f"{name} has {len(arr)} steps but actions has {T}.")
        key = f"demo_{max([_demo_index(k) for k in self._f['data']] + [-1]) + 1}"
        g = self._f["data"].create_group(key)
        g.create_dataset("actions", data=np.asarray(actions, dtype=np.float64))
        g.create_dataset("states", data=np.asarray(states, dtype=np.float64))
        g.create_dataset("robot_states", data=np.asarray(robot_states, dtype=np.float64))
        g.create_dataset("rewards", data=np.asarray(rewards, dtype=np.uint8))
        g.create_dataset("dones", data=np.asarray(dones, dtype=np.uint8))
        og = g.create_group("obs")
        for k, v in obs.items():
            v = np.asarray(v)
            if k in IMAGE_KEYS:
                og.create_dataset(
                    k, data=v.astype(np.uint8), chunks=(1, *v.shape[1:]), compression=self.image_compression
                )
            else:
                og.create_dataset(k, data=v)
        g.attrs["num_samples"] = T
        for k, v in (attrs or {}).items():
            g.attrs[k] = v
        g.attrs["complete"] = True  # written last: a demo without it was cut short
        self._f.flush()
        return key

    def commit(self, extra_attrs: Optional[dict] = None) -> str:
        """Finish the file: totals and extra attributes, fsync, rename to the final name."""
        data = self._f["data"]
        keys = [k for k in data if _demo_index(k) >= 0]
        data.attrs["num_demos"] = len(keys)
        data.attrs["total"] = int(sum(int(data[k].attrs["num_samples"]) for k in keys))
        for k, v in (extra_attrs or {}).items():
            data.attrs[k] = v
        self._f.flush()
        self._f.close()
        with open(self.partial, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(self.partial, self.path)
        return self.path

    def close(self) -> None:
        """Close without committing (the ``.partial`` stays for a later resume)."""
        if self._f.id.valid:
            self._f.close()


def benchmark_language(task_name: str) -> str:
    """LIBERO's ``task.language`` of a task (``libero.libero.benchmark.grab_language_from_filename``): the task
    name's words, after the scene prefix of LIBERO-90/-10 names ("KITCHEN_SCENE3_turn_on_the_stove"). Written out
    here so that reading a file needs no LIBERO install (GPU nodes); tested against LIBERO for all 130 tasks."""
    if task_name[:1].isupper():
        task_name = task_name[task_name.find("SCENE") + (8 if "SCENE10" in task_name else 7) :]
    return " ".join(task_name.split("_"))


def read_instruction(path: str) -> str:
    with DemoFile(path) as f:
        return f.instruction


def load_demos(paths: Sequence[str], obs_keys: Iterable[str], num_demos: Optional[int] = None) -> list[dict]:
    """Aligned demos from one or more files (the first ``num_demos`` of each file when given)."""
    demos = []
    for path in paths:
        with DemoFile(path) as f:
            for key in f.demo_keys[:num_demos]:
                demo = f.read(key, obs_keys)
                demo["source_file"], demo["demo_key"] = path, key
                demos.append(demo)
    return demos


# ----------------------------------------------------------------------------------------------------------------
# Action-chunk training data (bc_diffusion.py, ppo_gaussian.py)
# ----------------------------------------------------------------------------------------------------------------
def find_demo_files(demo_paths, data_root: str, source: str, suite: str, task_id: int) -> list[str]:
    """Explicit paths, or the data convention for one task; a clear error when a file is missing."""
    import libero_env as le

    if demo_paths:
        paths = list(demo_paths)
    else:
        task = le.resolve_task(suite, task_id)
        paths = [demo_path(data_root, source, task.suite, task.name)]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(
            f"No demonstrations at {missing[0]}; collect them (python collect.py --suite {suite} "
            f"--task-id {task_id}) or pass --demo-paths."
        )
    return paths


class ChunkDataset:
    """All demos in memory, observations converted once (libero_env.policy_obs); sample (observation at t,
    action chunk t..t+H-1) with the last action repeated past an episode's end (Diffusion Policy's padding).

    ``obs`` and ``actions`` are the numpy arrays; sampling gathers from torch copies of them that :meth:`to` moves
    to the training device (uint8 images stay uint8 there), so a GPU step copies no images from the host."""

    def __init__(self, demos: list[dict], obs_mode: str, image_size: int, horizon: int):
        import libero_env as le

        self.horizon = horizon
        obs_keys = list(le.CAMERAS) if obs_mode == "rgb" else ["object_state"]
        converted = [le.policy_obs(d["obs"], image_size if obs_mode == "rgb" else None) for d in demos]
        self.obs = {k: np.concatenate([c[k] for c in converted]) for k in [*obs_keys, "proprio"]}
        self.actions = np.concatenate([d["actions"] for d in demos]).astype(np.float32)
        lengths = np.array([len(d["actions"]) for d in demos])
        ends = np.cumsum(lengths)
        self.episode_end = np.repeat(ends, lengths)  # exclusive end of each sample's episode
        self.num_samples, self.num_demos = int(ends[-1]), len(demos)
        self.to("cpu")

    def to(self, device) -> ChunkDataset:
        import torch

        self.device = torch.device(device)
        self._obs = {k: torch.from_numpy(v).to(self.device) for k, v in self.obs.items()}
        self._actions = torch.from_numpy(self.actions).to(self.device)
        self._episode_end = torch.from_numpy(self.episode_end).to(self.device)
        return self

    def sample(self, batch_size: int, generator, shift: int = 0):
        """A training batch drawn from the (CPU) torch ``generator``, on the dataset's device: (obs dict of tensors
        (B, ...), action chunks (B, H, 7)). Camera images come channels first, (B, 3, H, W) uint8, randomly shifted
        by up to ``shift`` pixels."""
        import torch

        import libero_env as le

        idx = torch.randint(0, self.num_samples, (batch_size,), generator=generator).to(self.device)
        steps = torch.arange(self.horizon, device=self.device)
        chunk = torch.minimum(idx[:, None] + steps, self._episode_end[idx, None] - 1)
        obs = {k: v[idx] for k, v in self._obs.items()}
        for key in le.CAMERAS:  # fixed order, so the generator's draws do not depend on dict order
            if key in obs:
                obs[key] = random_shift(obs[key].permute(0, 3, 1, 2), shift, generator)
        return obs, self._actions[chunk]


def random_shift(images, pad: int, generator):
    """DrQ-style augmentation of (B, C, H, W) images: replicate-pad by ``pad`` and crop back at a random offset
    per sample (offsets from the CPU torch ``generator``); ``pad`` 0 returns the images unchanged.

    Computed as one gather with clamped row/column indices (the replicate padding), on the images' device and in
    their dtype."""
    import torch

    if pad <= 0:
        return images
    B, _, H, W = images.shape
    offsets = torch.randint(0, 2 * pad + 1, (B, 2), generator=generator).to(images.device) - pad
    rows = (offsets[:, :1] + torch.arange(H, device=images.device)).clamp(0, H - 1)  # (B, H)
    cols = (offsets[:, 1:] + torch.arange(W, device=images.device)).clamp(0, W - 1)  # (B, W)
    b = torch.arange(B, device=images.device)[:, None, None]
    return images.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (B, C, H, W)


def load_chunk_dataset(paths: list[str], obs_mode: str, image_size: int, horizon: int, num_demos=None):
    """A :class:`ChunkDataset` over the first ``num_demos`` demos of each file, checking the needed keys."""
    import libero_env as le

    keys = ["ee_pos", "ee_ori", "gripper_states"] + (list(le.CAMERAS) if obs_mode == "rgb" else ["object_state"])
    for path in paths:
        with DemoFile(path) as f:
            lacking = sorted(set(keys) - set(f.obs_keys()))
            if lacking:
                hint = (
                    " (LIBERO's original files have no object_state: use --obs-mode rgb)"
                    if "object_state" in lacking
                    else ""
                )
                raise TrajectoryFileError(f"{path} lacks {lacking}{hint}.")
    return ChunkDataset(load_demos(paths, keys, num_demos), obs_mode, image_size, horizon)
