"""collect.py — phase 3: roll out a policy in parallel LIBERO environments and keep successful trajectories.

Episode e starts (env seed ``seed + e``) from a layout LIBERO's placement initializer samples from that seed
(``--layouts sampled``, the default: the protocol's 50 fixed init states stay held out for evaluation), or with
``--layouts protocol`` from init state e % 50; the file records which (root attribute ``layouts``). Every step
records the observation the action was chosen from (both cameras, proprio, ee/joint states, LIBERO's
object-state vector, the simulator state), failed episodes are dropped, actions are stored as executed (no
filtering: no-op statistics are analyze.py's to measure), and the file is written atomically to
``data/<source>/<suite>/<task_name>_demo.hdf5``. A killed run leaves ``<file>.partial``; rerunning continues
from it.

Policies: ``scripted`` — scripted_expert.py's goal-driven expert, which reads ground-truth poses and joint states
from the simulator (privileged information; a way to get real LIBERO demonstrations without downloading LIBERO's
human data; it runs the tasks its measured table lists, others only with ``--scripted-unlisted``);
``diffusion`` / ``gaussian`` — checkpoints of bc_diffusion.py / ppo_diffusion.py / ppo_gaussian.py;
``vla`` — a pi0 checkpoint of finetune_vla.py.

    python collect.py --policy scripted --suite libero_object --task-id 0 --num-success 50
    python collect.py --list-scripted-tasks
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import tyro
from tqdm import tqdm

import bc_diffusion
import demo_hdf5
import libero_env as le
import ppo_diffusion
import ppo_gaussian
import run_utils
import scripted_expert
import vector_env as ve


@dataclass
class Args:
    exp_name: str = "collect"
    """name of this run (used in logs only)"""
    seed: int = 0
    """episode e: env seed ``seed + e``; also seeds a learned policy's sampling noise and the scripted expert's"""
    cuda: bool = True
    """run learned policies on CUDA when available"""
    fast_step: bool = True
    """step the simulator on libero_env's fast path (same dynamics up to MuJoCo's solver tolerance; --no-fast-step:
    robosuite's own loop)"""

    policy: Literal["scripted", "diffusion", "gaussian", "vla"] = "scripted"
    """which policy generates the data"""
    ckpt: Optional[str] = None
    """checkpoint of a learned policy (default: the path convention of its phase)"""
    ckpt_phase: str = "ppo"
    """for --policy diffusion without --ckpt: load the 'ppo' (ppo_diffusion) or 'bc' (bc_diffusion) checkpoint"""
    instruction: Optional[Literal["bddl", "benchmark"]] = None
    """prompt of a vla policy: bddl (the BDDL :language) or benchmark (LIBERO's task.language); default: the
    convention its checkpoint was trained with"""
    suite: str = "all"
    """libero_spatial | libero_object | libero_goal | libero_10 | libero_90 | all (then --task-id is global)"""
    task_id: int = 10
    """task index (global 0-129 with --suite all, else within the suite)"""
    num_success: int = 50
    """successful trajectories to keep"""
    max_episodes: int = 500
    """give up after this many episodes (successes or not)"""
    layouts: Literal["sampled", "protocol"] = "sampled"
    """where episodes start: sampled, a layout LIBERO's placement initializer draws from the episode's seed (never
    one of the protocol's 50 init states, which evaluation holds out); protocol, episode e from init state e % 50"""
    num_envs: int = 2
    """parallel environment workers"""
    image_size: int = 256
    """stored camera resolution (OpenVLA's regenerated LIBERO data uses 256)"""
    obs_mode: Literal["rgb", "state"] = "rgb"
    """rgb: store both cameras; state: no rendering, no images (fast; enough for --obs-mode state policies)"""
    action_mode: Literal["auto", "sample", "mean", "eta0"] = "auto"
    """how a learned policy acts (ACTION_MODES): auto, the mode its checkpoint names (a PPO run's --eval-mode, mean
    by default; eta0 for a BC diffusion checkpoint); sample, as in the RL rollouts; mean, the rollout
    chain's means (Gaussian: its mean); eta0, deterministic DDIM (Gaussian: its mean)"""
    replan_steps: int = 0
    """actions executed per policy query (0: the policy's default: scripted 1, diffusion act_steps, vla 5)"""
    ddim_steps: int = 5
    """DDIM steps of a BC diffusion policy's sampler (a ppo_diffusion checkpoint runs its fine-tuned schedule)"""
    scripted_noise: float = 0.0
    """std of Gaussian noise added to the scripted expert's executed arm actions (perturbed, varied demos)"""
    scripted_label: Literal["expert", "executed"] = "expert"
    """action stored with --scripted-noise: the expert's noise-free action (DART, Laskey et al. 2017: the demos
    show how to correct perturbed states, which BC needs against compounding errors) or the noisy executed one"""
    scripted_placement: Literal["release", "set-down"] = "release"
    """how the scripted expert ends a pick and place on top of another object: release (open 1 cm above it, the
    object drops onto it) or set-down (lower it until it rests on it, held, then open: LIBERO's On holds at the
    touch, so most demos end held); onto a region, into a container or a drawer both release"""
    data_root: str = "data"
    """root of the data convention data/<source>/<suite>/<task_name>_demo.hdf5"""
    run_root: str = "runs"
    """root of the checkpoint convention (learned policies)"""
    source: Optional[str] = None
    """source tag of the file (default: scripted | diffusion_rl | gaussian_rl | vla by --policy)"""
    save: bool = True
    """write the HDF5 file (off: only measure the success rate)"""
    resume: Literal["auto", "never"] = "auto"
    """auto: continue from a .partial left by a killed run; never: start clean"""
    list_scripted_tasks: bool = False
    """print the tasks the scripted expert was measured to solve (>= 80 % of the 50 init states) and exit"""
    scripted_unlisted: bool = False
    """let the scripted expert attempt a task its measured table does not list (to measure it)"""


DEFAULT_SOURCE = {"scripted": "scripted", "diffusion": "diffusion_rl", "gaussian": "gaussian_rl", "vla": "vla"}


# ================================================================================================================
# Policies and episode recording
# ================================================================================================================
CKPT_PHASES = {"diffusion": {"ppo": "ppo_diffusion", "bc": "bc_diffusion"}, "gaussian": {"ppo": "ppo_gaussian"}}


def default_checkpoint(args: Args, task: le.Task) -> str:
    """The checkpoint convention: runs/<phase>/<suite>/task<NN>__seed<S>/checkpoints/final.pt."""

    phases = CKPT_PHASES[args.policy]
    if args.ckpt_phase not in phases:
        raise ValueError(f"--ckpt-phase for --policy {args.policy} must be one of {sorted(phases)}.")
    run_dir = run_utils.task_run_dir(args.run_root, phases[args.ckpt_phase], task.suite, task.local_id, args.seed)
    return os.path.join(run_dir, "checkpoints", "final.pt")


def check_args(args: Args) -> Optional[list[scripted_expert.Step]]:
    """Everything a user can get wrong, checked before any environment is built."""
    le.check_task_args(args.suite, args.task_id)
    if args.num_success < 1 or args.max_episodes < 1 or args.num_envs < 1:
        raise ValueError("--num-success, --max-episodes and --num-envs must be at least 1.")
    ve.check_memory(args.num_envs)
    task = le.resolve_task(args.suite, args.task_id)
    if args.policy == "scripted":
        steps = scripted_expert.plan(task)
        if not args.scripted_unlisted and task not in scripted_expert.listed_tasks():
            raise ValueError(
                f"The scripted expert is not measured to solve task '{task.name}' (docs/scripted_expert_table.md "
                "lists what it solves at >= 80 %); pass --scripted-unlisted to attempt it anyway."
            )
        return steps
    if args.policy == "vla":
        if args.ckpt is None:
            raise ValueError("--policy vla needs --ckpt (a finetune_vla.py checkpoint directory).")
    else:
        args.ckpt = args.ckpt or default_checkpoint(args, task)
    if not os.path.exists(args.ckpt):
        raise FileNotFoundError(f"No checkpoint at {args.ckpt}; train that phase first or pass --ckpt.")
    return None


def load_learned_policy(kind: str, ckpt: str, task: le.Task, action_mode="auto", ddim_steps=5, seed=0, cuda=True,
                        instruction: Optional[str] = None):  # fmt: skip
    """A checkpoint of bc_diffusion / ppo_diffusion (``diffusion``), ppo_gaussian (``gaussian``) or finetune_vla
    (``vla``) as a :class:`LearnedPolicy` acting in ``action_mode`` (``auto``: the mode the checkpoint names).
    A vla policy is prompted in the instruction convention its checkpoint was trained with, or ``instruction``;
    it draws its flow-matching noise from the global RNG (seeded by the caller)."""
    device = torch.device("cuda" if cuda and torch.cuda.is_available() else "cpu")
    if kind == "vla":
        from vla_data import Pi0Policy, vla_prompt  # transformers takes seconds to import: only for pi0

        prompt, convention = vla_prompt(ckpt, task, instruction)
        policy = Pi0Policy(ckpt, prompt, device)
        info = {**policy.info, "prompt": prompt, "prompt_convention": convention}
        return ve.LearnedPolicy(lambda obs, gens: policy.act(obs), policy.cfg["act_steps"], "rgb", 256, info, seed)
    if kind == "gaussian":
        saved = run_utils.load_checkpoint(ckpt, ppo_gaussian.CKPT_FORMATS)
        mode = saved["args"].get("eval_mode", "mean") if action_mode == "auto" else action_mode
        policy = ppo_gaussian.load_policy(ckpt, device)
        cfg, info = policy.cfg, {"ckpt_format": saved["format"], "action_mode": mode}
        return ve.LearnedPolicy(policy.acting(mode), cfg["act_steps"], cfg["obs_mode"], cfg["image_size"], info, seed)
    saved = run_utils.load_checkpoint(ckpt, ("bc_diffusion/v1",) + ppo_diffusion.CKPT_FORMATS)
    fmt, mode = saved["format"], action_mode
    if fmt in ppo_diffusion.CKPT_FORMATS:
        mode = saved["args"].get("eval_mode", "eta0") if mode == "auto" else mode
        policy = ppo_diffusion.load_policy(ckpt, device)
        act = policy.acting(mode)
    else:  # a BC policy in the chain a PPO run starts from (DDIM-ddim_steps, eta 1, ppo_diffusion's defaults)
        mode = "eta0" if mode == "auto" else mode
        policy = ppo_diffusion.finetuning_start(bc_diffusion.load_policy(ckpt, device), ddim_steps)
        act = policy.acting(mode)

    cfg = policy.cfg
    info = {"ckpt_format": fmt, "action_mode": mode}
    return ve.LearnedPolicy(act, cfg["act_steps"], cfg["obs_mode"], cfg["image_size"], info, seed)


def episode_arrays(steps: list[dict]) -> dict:
    """Recorded steps of one episode -> the arrays of one HDF5 demo (observation t precedes action t)."""
    obs_keys = [k for k in steps[0]["obs"] if k not in ("sim_state", "robot_states", *le.PRIVILEGED_KEYS)]
    rewards = np.array([s["reward"] for s in steps])
    dones = np.array([s["done"] for s in steps], dtype=np.uint8)
    return dict(
        actions=np.stack([s["action"] for s in steps]),
        obs={k: np.stack([s["obs"][k] for s in steps]) for k in obs_keys},
        states=np.stack([s["obs"]["sim_state"] for s in steps]),
        robot_states=np.stack([s["obs"]["robot_states"] for s in steps]),
        rewards=rewards,
        dones=dones,
    )


def file_info(args: Args, task: le.Task, source: str, checkpoint: str) -> demo_hdf5.FileInfo:
    with open(task.bddl_file) as f:
        problem = re.search(r"\(problem\s+([\w]+)\)", f.read()).group(1).lower()
    env_kwargs = {
        "bddl_file_name": task.bddl_file,
        "camera_heights": args.image_size,
        "camera_widths": args.image_size,
        "camera_names": list(le.CAMERAS.values()),
        "controller": "OSC_POSE",
        "control_freq": le.CONTROL_HZ,
    }
    return demo_hdf5.FileInfo(
        instruction=task.instruction,
        benchmark_instruction=task.language,
        problem_name=problem,
        bddl_file_name=task.bddl_file,
        source=source,
        suite=task.suite,
        task_name=task.name,
        image_size=args.image_size if args.obs_mode == "rgb" else 0,
        checkpoint=checkpoint,
        env_kwargs=env_kwargs,
    )


def id_ranges(ids: list[int]) -> str:
    """Sorted ids as a SLURM array spec: [0, 1, 2, 5, 7, 8] -> "0-2,5,7-8"."""
    parts, ids = [], sorted(ids)
    for i in ids:
        if parts and parts[-1][1] == i - 1:
            parts[-1][1] = i
        else:
            parts.append([i, i])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in parts)


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.list_scripted_tasks:
        table, tasks = scripted_expert.measured_table(), scripted_expert.listed_tasks()
        print(f"{len(tasks)} tasks measured at >= {scripted_expert.LISTED_RATE:.0%} (docs/scripted_expert_table.md)")
        print(f"{'id':>3}  {'suite':<15} {'local':>5}  {'success':>7}  instruction")
        for t in tasks:
            k, n = table[t.suite, t.local_id]
            print(f"{t.global_id:>3}  {t.suite:<15} {t.local_id:>5}  {f'{k}/{n}':>7}  {t.instruction}")
        print(f"array: {id_ranges([t.global_id for t in tasks])}")  # for sbatch --array
        sys.exit(0)
    try:
        steps = check_args(args)
        task = le.resolve_task(args.suite, args.task_id)
        policy = None
        if args.policy != "scripted":
            policy = load_learned_policy(args.policy, args.ckpt, task, args.action_mode, args.ddim_steps,
                                         args.seed, args.cuda, args.instruction)  # fmt: skip
    except (ValueError, FileNotFoundError, le.TaskError) as e:
        sys.exit(f"error: {e}")
    if policy is not None and policy.obs_mode == "rgb" and args.obs_mode == "state":
        sys.exit("error: this policy sees camera images; collect with --obs-mode rgb.")
    source = args.source or DEFAULT_SOURCE[args.policy]
    out_path = demo_hdf5.demo_path(args.data_root, source, task.suite, task.name)
    print(f"task: {task.suite} {task.local_id} (global {task.global_id}) '{task.instruction}'")
    print(f"policy: {args.policy}  ->  {out_path if args.save else '(not saved)'}  (layouts: {args.layouts})")

    # ALGO LOGIC: resume or start clean
    writer, first_episode, attempts, successes, succeeded = None, 0, 0, 0, 0
    if args.save:
        if args.resume == "auto" and os.path.exists(out_path):
            with demo_hdf5.DemoFile(out_path) as existing:
                if len(existing) >= args.num_success:
                    print(f"{out_path} already holds {len(existing)} successful demos; nothing to do.")
                    sys.exit(0)
        writer = demo_hdf5.DemoWriter(
            out_path, file_info(args, task, source, args.ckpt or ""), resume=args.resume == "auto"
        )
        if writer.resumed_demos:
            earlier = writer.file_attrs.get("layouts", "protocol")
            if earlier != args.layouts:
                writer.close()
                sys.exit(f"error: {writer.partial} was started with --layouts {earlier}; rerun with --layouts "
                         f"{earlier}, or --resume never to start again.")  # fmt: skip
            placed = writer.file_attrs.get("scripted_placement", "release")
            if args.policy == "scripted" and placed != args.scripted_placement:
                writer.close()
                sys.exit(f"error: {writer.partial} was started with --scripted-placement {placed}; rerun with "
                         f"--scripted-placement {placed}, or --resume never to start again.")  # fmt: skip
            successes = writer.resumed_demos
            attempts = max(int(writer.file_attrs.get("num_attempts", successes)), successes)
            succeeded = max(int(writer.file_attrs.get("num_successful", successes)), successes)
            first_episode = int(writer.file_attrs.get("next_episode", attempts))
            print(f"continuing a killed run from {writer.partial}: {successes} demos kept, {attempts} episodes run")
        else:
            reason = " (discarded an unreadable .partial)" if writer.discarded_partial else ""
            print(f"starting clean{reason}")
        writer.set_attrs(layouts=args.layouts)
        if args.policy == "scripted":
            writer.set_attrs(scripted_noise=args.scripted_noise, scripted_label=args.scripted_label,
                             scripted_placement=args.scripted_placement)  # fmt: skip

    venv = ve.VectorLiberoEnv(
        task,
        args.num_envs,
        obs_mode=args.obs_mode,
        image_size=args.image_size,
        privileged=args.policy == "scripted",
        fast_step=args.fast_step,
    )
    if policy is None:
        scene = venv.call("scene", env_ids=[0])[0]
        policy = scripted_expert.ScriptedPolicy(steps, scene, args.scripted_noise, args.seed, args.scripted_placement)
    replan = args.replan_steps or policy.replan_steps
    bar = tqdm(total=args.num_success, initial=successes, desc="successes", unit="demo")
    # successes: demos kept; succeeded: every successful episode, also those still running when the last demo was kept
    state = {"attempts": attempts, "successes": successes, "succeeded": succeeded, "started": first_episode}

    def episodes():
        e = first_episode
        while state["successes"] < args.num_success and e < first_episode + args.max_episodes - attempts:
            state["started"] = e + 1
            yield e
            e += 1

    def on_episode_end(result: ve.EpisodeResult) -> None:
        state["attempts"] += 1
        state["succeeded"] += int(result.success)
        keep = result.success and state["successes"] < args.num_success
        if keep:
            state["successes"] += 1
            bar.update(1)
        if writer is not None:
            # progress counters first: add_demo flushes them together with the demo, so a run killed right after
            # never resumes with fewer attempts than demos or re-runs the episode it just kept
            writer.set_attrs(
                num_attempts=state["attempts"], num_successful=state["succeeded"], next_episode=state["started"]
            )
            if keep:
                if args.scripted_noise and args.scripted_label == "expert" and hasattr(policy, "expert_labels"):
                    labels = policy.expert_labels(result.episode)
                    assert len(labels) == len(result.steps), (len(labels), len(result.steps))
                    for step, label in zip(result.steps, labels):
                        step["action"] = label
                attrs = {"init_state_index": result.init_state, "seed": result.seed, "episode": result.episode,
                         "success": True}  # fmt: skip
                writer.add_demo(**episode_arrays(result.steps), attrs=attrs)
        if hasattr(policy, "by_episode"):
            policy.by_episode.pop(result.episode, None)
        bar.set_postfix(attempts=state["attempts"], rate=f"{state['succeeded'] / state['attempts']:.2f}")
        result.steps.clear()  # recorded images are large; keep only what was written

    start = time.time()
    try:
        ve.run_episodes(
            venv,
            policy,
            episodes(),
            seed=args.seed,
            replan_steps=replan,
            record=args.save,
            render=args.obs_mode == "rgb",
            on_episode_end=on_episode_end,
            reset_policy=getattr(policy, "reset", None),
            layouts=args.layouts,
        )
    finally:
        bar.close()
        venv.close()
    rate = state["succeeded"] / max(state["attempts"], 1)
    print(
        f"success rate {rate:.3f} ({state['succeeded']}/{state['attempts']} episodes, {state['successes']} kept) "
        f"in {time.time() - start:.0f} s"
    )
    if writer is not None:
        if state["successes"] >= args.num_success:
            writer.commit({"num_attempts": state["attempts"], "success_rate": rate})
            print(f"wrote {out_path}")
        else:
            writer.close()
            sys.exit(
                f"error: only {state['successes']} of {args.num_success} successes in {args.max_episodes} episodes; "
                f"kept them in {writer.partial} (rerun with a larger --max-episodes to continue)."
            )
