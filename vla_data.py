"""vla_data.py — pi0's data pipeline: the same inputs for training, evaluation and collection.

* preprocessing (OpenVLA's): images turned upright and resized with padding, the 8-d state and 7-d actions
  normalised by mean/std computed from the training data (saved with the checkpoint: :func:`save_stats`);
* :class:`TrajectoryDataset`, a streaming dataset over many HDF5 files (index in memory, images read on demand,
  no-op steps dropped, chunks padded by repeating the last action), and :func:`training_batch`;
* :class:`Pi0Policy`, a fine-tuned pi0 as evaluate.py's and collect.py's rollout policy.

finetune_vla.py trains on it; nothing here builds a model.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

import demo_hdf5
import libero_env as le

PROMPT_MAX_TOKENS = 48  # PI0Processor's default text length (image tokens come on top)


def prepare_tokenizer(tokenizer, model):
    """PI0Processor's setup: an ``<image>`` special token whose id is the model's ``image_token_id``."""
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.image_token = "<image>"
    image_id, expected = tokenizer.convert_tokens_to_ids("<image>"), model.config.vlm_config.image_token_id
    if image_id != expected:
        raise ValueError(
            f"the tokenizer's <image> id {image_id} differs from the model's image_token_id {expected}; "
            "pass the tokenizer that belongs to the model (--tokenizer-path)."
        )
    return tokenizer


# ================================================================================================================
# Inputs: the same preprocessing for training, evaluation and collection
# ================================================================================================================
def resize_with_pad(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) float -> (B, 3, size, size): aspect-preserving bilinear resize, zero (black) padding."""
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    out = F.interpolate(images, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (size - nh) // 2, (size - nw) // 2
    return F.pad(out, (left, size - nw - left, top, size - nh - top))


def image_tensor(upright_uint8: np.ndarray, size: int) -> torch.Tensor:
    """Upright (B, H, W, 3) uint8 -> pi0 pixel values (B, 3, size, size) in [-1, 1] (SigLIP's normalisation)."""
    x = torch.as_tensor(upright_uint8).permute(0, 3, 1, 2).float() / 255.0
    return resize_with_pad(x, size) * 2.0 - 1.0


def tokenize(tokenizer, instructions: list[str], num_image_tokens: int):
    """PI0Processor's prompt: <image> x tokens, <bos>, instruction, newline; right-padded."""
    prompts = [f"{tokenizer.image_token * num_image_tokens}{tokenizer.bos_token}{text}\n" for text in instructions]
    enc = tokenizer(
        prompts,
        padding="max_length",
        max_length=num_image_tokens + PROMPT_MAX_TOKENS,
        truncation=True,
        return_tensors="pt",
        add_special_tokens=False,
    )
    return enc["input_ids"], enc["attention_mask"]


def image_tokens_per_camera(model) -> int:
    vision = model.config.vlm_config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


def model_inputs(model, tokenizer, stats: dict, obs: dict, instructions: list[str], image_size: int) -> dict:
    """Batched raw observations (HDF5 naming, raw renders) -> the keyword arguments of pi0's forward/sample."""
    inputs = le.policy_obs(obs, None)
    cams = [image_tensor(le.upright(np.asarray(obs[k])), image_size) for k in le.CAMERAS]
    state = (torch.as_tensor(inputs["proprio"]) - stats["state_mean"]) / stats["state_std"]
    ids, mask = tokenize(tokenizer, instructions, len(cams) * image_tokens_per_camera(model))
    B = state.shape[0]
    return {
        "pixel_values": torch.stack(cams, 1),  # (B, n_cameras, 3, S, S)
        "pixel_attention_mask": torch.ones(B, len(cams), dtype=torch.bool),
        "input_ids": ids,
        "attention_mask": mask,
        "state": F.pad(state, (0, model.config.max_state_dim - state.shape[-1])),
    }


def compute_stats(actions: np.ndarray, states: np.ndarray) -> dict:
    return {
        "state_mean": torch.as_tensor(states.mean(0)).float(),
        "state_std": torch.as_tensor(states.std(0) + 1e-6).float(),
        "action_mean": torch.as_tensor(actions.mean(0)).float(),
        "action_std": torch.as_tensor(actions.std(0) + 1e-6).float(),
    }


def save_stats(path: str, stats: dict) -> None:
    import run_utils

    run_utils.write_json(path, {k: v.tolist() for k, v in stats.items()})


def load_stats(path: str) -> dict:
    with open(path) as f:
        return {k: torch.tensor(v, dtype=torch.float32) for k, v in json.load(f).items()}


# ================================================================================================================
# Data: a streaming dataset over many HDF5 files (index in memory, images read on demand)
# ================================================================================================================
def find_files(specs, suites=None, task_names=None) -> list[str]:
    paths = []
    for spec in specs:
        if os.path.isdir(spec):
            paths += glob.glob(os.path.join(spec, "**", "*_demo.hdf5"), recursive=True)
        elif any(c in spec for c in "*?["):
            paths += glob.glob(spec, recursive=True)
        elif os.path.isfile(spec):
            paths.append(spec)
    keep = []
    for p in sorted(set(paths)):
        if task_names and os.path.basename(p)[: -len("_demo.hdf5")] not in task_names:
            continue
        if suites and os.path.basename(os.path.dirname(p)) not in suites:
            continue
        keep.append(p)
    if not keep:
        raise FileNotFoundError(
            f"No *_demo.hdf5 files under {list(specs)}"
            + (f" for suites {list(suites)}" if suites else "")
            + "; collect data with collect.py or check --data."
        )
    return keep


class TrajectoryDataset(torch.utils.data.Dataset):
    """Samples (observation at step t, the next ``chunk`` kept actions) from many trajectory files.

    The index (files, demos, kept steps after the no-op filter) and the normalisation statistics are built once;
    images are read lazily and each DataLoader worker opens its own HDF5 handles. Past an episode's end the
    last action repeats.
    """

    def __init__(self, paths: list[str], chunk: int, filter_noops: bool, instruction: str = "benchmark"):
        self.paths, self.chunk, self._files = paths, chunk, {}
        self.entries, self.instructions = [], []  # entries: (file index, demo key, kept stored indices)
        actions, states = [], []
        for fi, path in enumerate(paths):
            with demo_hdf5.DemoFile(path) as f:
                self.instructions.append(f.benchmark_instruction if instruction == "benchmark" else f.instruction)
                for key in f.demo_keys:
                    d = f.read(key, ["ee_pos", "ee_ori", "gripper_states"])
                    keep = (
                        np.flatnonzero(~demo_hdf5.noop_mask(d["actions"]))
                        if filter_noops
                        else np.arange(len(d["actions"]))
                    )
                    if len(keep) == 0:
                        continue
                    self.entries.append((fi, key, keep))
                    actions.append(d["actions"][keep])
                    states.append(le.proprio(d["obs"])[keep])
        self.stats = compute_stats(np.concatenate(actions), np.concatenate(states))
        lengths = np.array([len(e[2]) for e in self.entries])
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.num_noops = 0

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _file(self, fi: int) -> demo_hdf5.DemoFile:
        if fi not in self._files:  # opened in the worker that reads it
            self._files[fi] = demo_hdf5.DemoFile(self.paths[fi])
        return self._files[fi]

    def __getitem__(self, idx: int) -> dict:
        e = int(np.searchsorted(self.offsets, idx, side="right") - 1)
        fi, key, keep = self.entries[e]
        j = idx - self.offsets[e]
        f = self._file(fi)
        t = int(keep[j])
        step = f.read(key, ["ee_pos", "ee_ori", "gripper_states", *le.CAMERAS], start=t, stop=t + 1)
        future = keep[j : j + self.chunk]
        all_actions = f.read(key, [], start=int(future[0]), stop=int(future[-1]) + 1)["actions"]
        actions = all_actions[future - future[0]]
        actions = np.concatenate([actions, np.repeat(actions[-1:], self.chunk - len(actions), 0)])
        return {
            "obs": {k: v[0] for k, v in step["obs"].items()},
            "actions": actions.astype(np.float32),
            "instruction": self.instructions[fi],
        }


def collate(samples: list[dict]) -> dict:
    return {
        "obs": {k: np.stack([s["obs"][k] for s in samples]) for k in samples[0]["obs"]},
        "actions": torch.as_tensor(np.stack([s["actions"] for s in samples])),
        "instruction": [s["instruction"] for s in samples],
    }


def training_batch(model, tokenizer, stats, batch: dict, image_size: int) -> dict:
    inputs = model_inputs(model, tokenizer, stats, batch["obs"], batch["instruction"], image_size)
    actions = (batch["actions"] - stats["action_mean"]) / stats["action_std"]
    inputs["actions"] = F.pad(actions, (0, model.config.max_action_dim - actions.shape[-1]))
    return inputs


# ================================================================================================================
# Policy wrapper for evaluate.py / collect.py
# ================================================================================================================
def vla_prompt(ckpt_dir: str, task: le.Task, convention: Optional[str] = None) -> tuple[str, str]:
    """(prompt text, convention) for ``task``: the instruction convention the checkpoint was trained with, unless
    ``convention`` overrides it (e.g. to evaluate a pi0 trained elsewhere on the public LIBERO data: benchmark).
    Checkpoints from before the choice was recorded were trained on the BDDL text."""
    with open(os.path.join(ckpt_dir, "train_info.json")) as f:
        convention = convention or json.load(f).get("instruction", "bddl")
    return task.prompt(convention), convention


class Pi0Policy:
    """A fine-tuned pi0 as a rollout policy: ``act(obs) -> (B, chunk, 7)``; the caller executes ``replan_steps``.
    ``sample_actions`` computes the prefix (images + prompt) once per query and reuses its KV cache over all
    flow-matching steps."""

    def __init__(self, ckpt_dir: str, instruction: str, device="cpu", num_steps: Optional[int] = None):
        from transformers import AutoTokenizer, PI0ForConditionalGeneration

        self.model = PI0ForConditionalGeneration.from_pretrained(os.path.join(ckpt_dir, "model")).to(device).eval()
        self.tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(os.path.join(ckpt_dir, "model")), self.model)
        self.stats = load_stats(os.path.join(ckpt_dir, "norm_stats.json"))
        with open(os.path.join(ckpt_dir, "train_info.json")) as f:
            self.info = json.load(f)
        self.instruction, self.device, self.num_steps = instruction, device, num_steps
        self.cfg = {"obs_mode": "rgb", "act_steps": 5, "image_size": self.info["image_size"]}

    @torch.no_grad()
    def act(self, obs: dict, noise: Optional[torch.Tensor] = None) -> np.ndarray:
        B = len(obs["ee_pos"])
        inputs = model_inputs(
            self.model, self.tokenizer, self.stats, obs, [self.instruction] * B, self.info["image_size"]
        )
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        out = self.model.sample_actions(**inputs, noise=noise, num_steps=self.num_steps)  # (B, chunk, max_action_dim)
        actions = out[..., : le.ACTION_DIM].float().cpu() * self.stats["action_std"] + self.stats["action_mean"]
        return actions.numpy()
