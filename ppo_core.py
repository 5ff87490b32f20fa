"""ppo_core.py — the PPO machinery both policy classes share (ppo_diffusion.py, ppo_gaussian.py).

What is specific to the policy class stays in its script: the denoising MDP, its log-probs, clip schedule and update
in ppo_diffusion.py (and the critic both use); the Gaussian head and its update in ppo_gaussian.py. What is the same
for both lives here, so that "the same training procedure" is one piece of code, not two copies:

- the rollout: ``num_envs`` episodes stepped chunk by chunk, from sampled layouts (or the protocol's 50), each
  observation tagged with its elapsed fraction t / limit (the critic's input), with the success reward (sparse, or
  DPPO's reward-until-the-limit in closed form) and a running reward scale;
- returns: chunk-level GAE with success and time-out both terminal (value 0), only an episode cut by the end of an
  iteration bootstrapped (ALGORITHM.md), and the critic's explained variance;
- the update's schedule: minibatches, per-minibatch advantage normalisation, the actor's learning rate;
- evaluation under the LIBERO protocol (episode e from init state e % 50, its own noise seed), in-run and final.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

import analyze
import libero_env as le
import run_utils
import vector_env as ve
from networks import ObsEncoder, mlp


# ================================================================================================================
# Rollouts: episodes, rewards and their scale
# ================================================================================================================
class Rollout:
    """Keeps ``num_envs`` episodes running across iterations; each :meth:`collect` gathers ``num_steps`` chunk steps.

    Training episode n has env seed ``seed + 10^6 + n`` (disjoint from evaluation seeds) and starts from the layout
    LIBERO samples from that seed (``layouts="sampled"``: the protocol's 50 init states stay held out for
    evaluation), or from an init state drawn uniformly from the 50 (``"protocol"``). Every observation carries
    ``time``, the elapsed fraction t / step limit of its episode (the critic's input; the actor ignores it).

    ``pipelined``: every worker's envs run on their own, so that one worker steps while the policy computes for
    another's and none waits for the slowest (the lockstep schedule waits at every chunk step). Nothing then may
    depend on which worker answers first: env i's k-th episode has seed ``seed + 10^6 + i + E k`` (E envs) and its
    policy noise comes from env i's own generator (``act(obs_t, generators)``), so the batch is the same for any
    grouping and timing (test), though not the lockstep schedule's (its seeds count episodes as they end and its
    noise is drawn for the whole batch from the global RNG).
    """

    def __init__(self, venv: ve.VectorLiberoEnv, preprocess: Callable, seed: int, render: bool,
                 success_reward: Optional[Callable[[int], float]] = None, layouts: str = "sampled",
                 pipelined: bool = False):  # fmt: skip
        """``success_reward(t)``: the reward of a success at env step t (None: the sparse reward, 1)."""
        ve.episode_init_state(0, layouts)  # an unknown split fails here
        self.venv, self.preprocess, self.render, self.layouts = venv, preprocess, render, layouts
        self.success_reward, self.pipelined = success_reward, pipelined
        self.max_steps = venv.task.max_steps
        self.rng, self.seed, self.episodes = np.random.default_rng(seed), seed, 0
        self.t = np.zeros(venv.num_envs)  # steps taken in each env's current episode
        self.obs: Optional[list] = None  # started by the first collect
        self.episode_returns, self.episode_lengths = [], []
        # pipelined: per env, its episode count and its policy-noise generator (see the class docstring)
        self.env_episodes = np.zeros(venv.num_envs, dtype=np.int64)
        self.generators = [torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 1, i]).generate_state(1)[0]))
                           for i in range(venv.num_envs)] if pipelined else None  # fmt: skip

    def reset_all(self) -> None:
        self.obs = self._reset(list(range(self.venv.num_envs)))

    def state_dict(self) -> dict:
        """What a resumed run needs to start the same episodes: the init-state RNG and the episode counter (and,
        pipelined, every env's episode count and noise generator)."""
        state = {"rng": self.rng.bit_generator.state, "episodes": self.episodes}
        if self.pipelined:
            state.update(env_episodes=self.env_episodes.tolist(), generators=[g.get_state() for g in self.generators])
        return state

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state, self.episodes = state["rng"], int(state["episodes"])
        if self.pipelined and "env_episodes" in state:
            self.env_episodes[:] = state["env_episodes"]
            for g, g_state in zip(self.generators, state["generators"]):
                g.set_state(g_state)

    def reward(self, out: le.ChunkResult) -> float:
        return self.success_reward(out.t) if out.done and self.success_reward is not None else out.reward

    def _reset(self, ids: list[int]) -> list[dict]:
        if self.pipelined:  # env i's k-th episode: a seed and an init state that no schedule can reorder
            E, k = self.venv.num_envs, self.env_episodes[ids]
            seeds = [self.seed + 1_000_000 + i + E * int(n) for i, n in zip(ids, k)]
            inits = [int(np.random.SeedSequence([self.seed, 2, s]).generate_state(1)[0] % le.NUM_INIT_STATES)
                     for s in seeds]  # fmt: skip
            self.env_episodes[ids] += 1
        else:
            inits = self.rng.integers(0, le.NUM_INIT_STATES, len(ids))  # drawn either way: one RNG stream per seed
            seeds = [self.seed + 1_000_000 + self.episodes + j for j in range(len(ids))]
        if self.layouts == "sampled":
            inits = [le.SAMPLED] * len(ids)
        self.episodes += len(ids)
        self.t[ids] = 0
        return self.venv.reset(ids, inits, seeds, render=self.render)

    def observe(self, ids: Optional[list[int]] = None) -> dict:
        """The current observations (of the envs ``ids``, else all) as policy tensors, with their elapsed fractions
        (``time``, (E,))."""
        ids = list(range(self.venv.num_envs)) if ids is None else ids
        obs_t = self.preprocess(le.stack_obs([self.obs[i] for i in ids]))
        time_t = torch.as_tensor(self.t[ids] / self.max_steps, dtype=torch.float32)
        obs_t["time"] = time_t.to(obs_t["proprio"].device)
        return obs_t

    def _record(self, ids: list[int], outs: list) -> list[int]:
        """Take the chunk results of the envs ``ids`` (observations, episode ends); the envs whose episode ended."""
        for i, o in zip(ids, outs):
            self.obs[i], self.t[i] = o.obs, o.t
            if o.done or o.truncated:
                self.episode_returns.append(float(o.done))
                self.episode_lengths.append(o.t)
        return [i for i, o in zip(ids, outs) if o.done or o.truncated]

    def collect(self, num_steps: int, act: Callable, timers: dict, reset: bool = False) -> dict:
        """``act(obs_t) -> (actions (E, act_steps, 7) numpy, extras dict of CPU tensors (E, ...))``; ``obs_t`` are the
        preprocessed observation tensors (on the policy's device; the buffer keeps CPU copies). ``reset``: start
        every env on a new episode first (else the running ones continue)."""
        ids = list(range(self.venv.num_envs))
        if reset or self.obs is None:
            t0 = time.perf_counter()
            self.reset_all()
            timers["env"] += time.perf_counter() - t0
        if self.pipelined:  # one torch thread meanwhile: the policy's calls then do not fight the stepping workers
            threads = torch.get_num_threads()  # for the cores (benchmarks/RESULTS.md: 0.92x with two, 1.04x with one)
            torch.set_num_threads(1)
            try:
                return self._collect_pipelined(num_steps, act, timers)
            finally:
                torch.set_num_threads(threads)
        buf = {"obs": [], "extras": [], "rewards": [], "terminated": [], "truncated": []}
        for _ in range(num_steps):
            t0 = time.perf_counter()
            obs_t = self.observe()
            actions, extras = act(obs_t)
            obs_t = {k: v.cpu() for k, v in obs_t.items()}
            t1 = time.perf_counter()
            outs = self.venv.step_chunk(ids, actions, render=self.render)
            timers["env"] += time.perf_counter() - t1
            timers["policy"] += t1 - t0
            buf["obs"].append(obs_t)
            buf["extras"].append(extras)
            buf["rewards"].append([self.reward(o) for o in outs])
            buf["terminated"].append([float(o.done) for o in outs])
            buf["truncated"].append([float(o.truncated) for o in outs])
            done = self._record(ids, outs)
            if done:
                t2 = time.perf_counter()
                for i, o in zip(done, self._reset(done)):
                    self.obs[i] = o
                timers["env"] += time.perf_counter() - t2
        return self._batch(buf)

    def _batch(self, buf: dict) -> dict:
        stack = lambda key: torch.stack([torch.as_tensor(np.asarray(x), dtype=torch.float32) for x in buf[key]])  # noqa: E731
        return {
            "obs": {k: torch.stack([o[k] for o in buf["obs"]]) for k in buf["obs"][0]},  # (T, E, ...)
            "extras": {k: torch.stack([x[k] for x in buf["extras"]]) for k in buf["extras"][0]},
            "rewards": stack("rewards"),
            "terminated": stack("terminated"),
            "truncated": stack("truncated"),
            "next_obs": {k: v.cpu() for k, v in self.observe().items()},  # where the iteration cut the episodes
        }

    def _collect_pipelined(self, num_steps: int, act: Callable, timers: dict) -> dict:
        """:meth:`collect` with every worker's envs on their own: a worker's chunk results in, its envs' next
        actions (``act(obs_t, generators)``, its rows only) out at once, while the other workers step. The same
        batch as any other grouping or timing: see the class docstring."""
        start, policy_s = time.perf_counter(), [0.0]
        E, groups = self.venv.num_envs, [g for g in self.venv.groups if g]
        rows = {key: [[None] * E for _ in range(num_steps)] for key in ("obs", "extras")}
        outs_at = [[None] * E for _ in range(num_steps)]
        step_of = {}  # worker -> the chunk step its envs are on

        def launch(w: int, ids: list[int]) -> None:
            t0 = time.perf_counter()
            obs_t = self.observe(ids)
            actions, extras = act(obs_t, [self.generators[i] for i in ids])
            obs_t = {k: v.cpu() for k, v in obs_t.items()}
            for j, i in enumerate(ids):
                rows["obs"][step_of[w]][i] = {k: v[j] for k, v in obs_t.items()}
                rows["extras"][step_of[w]][i] = {k: v[j] for k, v in extras.items()}
            policy_s[0] += time.perf_counter() - t0
            args = [(np.asarray(a), self.render, False) for a in actions]
            self.venv.submit(ids, "step_chunk", args)

        by_worker = {self.venv.worker_of[g[0]]: g for g in groups}
        if num_steps > 0:
            for w, ids in by_worker.items():
                step_of[w] = 0
                launch(w, ids)
        while step_of:
            for w in self.venv.ready(list(step_of)):
                ids, t = by_worker[w], step_of[w]
                outs = self.venv.receive(w, "step_chunk")
                for i, o in zip(ids, outs):
                    outs_at[t][i] = o
                done = self._record(ids, outs)
                for i, o in zip(done, self._reset(done) if done else []):  # only this worker's envs: no barrier
                    self.obs[i] = o
                if t + 1 < num_steps:
                    step_of[w] = t + 1
                    launch(w, ids)
                else:
                    del step_of[w]
        timers["policy"] += policy_s[0]
        timers["env"] += time.perf_counter() - start - policy_s[0]  # the rest of the wall (stepping overlaps it)
        buf = {"obs": [], "extras": [], "rewards": [], "terminated": [], "truncated": []}
        for t in range(num_steps):
            buf["obs"].append({k: torch.stack([r[k] for r in rows["obs"][t]]) for k in rows["obs"][t][0]})
            buf["extras"].append({k: torch.stack([r[k] for r in rows["extras"][t]]) for k in rows["extras"][t][0]})
            buf["rewards"].append([self.reward(o) for o in outs_at[t]])
            buf["terminated"].append([float(o.done) for o in outs_at[t]])
            buf["truncated"].append([float(o.truncated) for o in outs_at[t]])
        return self._batch(buf)


def check_resumed_layouts(path: str, saved_args: dict, layouts: str) -> None:
    """A run continues on the layouts it started on (a checkpoint from before the split trained on the protocol's)."""
    saved = saved_args.get("train_layouts", "protocol")
    if saved != layouts:
        raise run_utils.CheckpointError(
            f"{path} was trained with --train-layouts {saved}; resume with --train-layouts "
            f"{saved}, or start a new run (--resume never or another --run-root)."
        )


# ================================================================================================================
# The critic both policy classes train
# ================================================================================================================
class Critic(nn.Module):
    """V(s, t / limit): its own observation encoder (same architecture as the actor's) and an MLP head that also
    sees the elapsed fraction of the episode's step limit. With time-outs terminal (value 0) the value of a state
    depends on the time left; without it the critic is not Markov (ALGORITHM.md)."""

    def __init__(self, cfg: dict, hidden):
        super().__init__()
        self.encoder = ObsEncoder(cfg)
        self.head = mlp([self.encoder.out_dim + 1, *hidden, 1])

    def forward(self, obs_t: dict) -> torch.Tensor:
        features = torch.cat([self.encoder(obs_t), obs_t["time"].unsqueeze(-1).to(torch.float32)], dim=-1)
        return self.head(features).squeeze(-1)


def success_return(t: int, max_steps: int, act_steps: int, gamma: float) -> float:
    """The reward of a success at env step ``t`` under --reward-until-limit: the discounted return of an episode that
    would hold its success, at reward 1 per chunk, until the step limit: 1 + gamma + ... + gamma^n over the
    n = ceil((max_steps - t) / act_steps) chunks left. DPPO does not end its robomimic episodes at success and pays the
    reward at every step after it; in LIBERO a reached goal stays reached, so this pays the same without simulating
    the rest of the episode."""
    n = math.ceil(max(max_steps - t, 0) / act_steps)
    return (1 - gamma ** (n + 1)) / (1 - gamma) if gamma < 1 else float(n + 1)


def success_reward_fn(args, max_steps: int, act_steps: int) -> Optional[Callable[[int], float]]:
    """The rollouts' reward of a success at env step t: :func:`success_return` under --reward-until-limit, else None
    (the sparse reward, 1)."""
    if not args.reward_until_limit:
        return None
    return lambda t: success_return(t, max_steps, act_steps, args.gamma)


class RunningRewardScaler:
    """Rewards divided by the running std of the per-env discounted return and clipped to +-``clip`` (DPPO, after
    OpenAI baselines' VecNormalize). The statistics are updated once per iteration, over all of its T x E returns,
    so every reward of an iteration is scaled by the same number (a step-by-step update scaled a run's first
    successes ~3x more than later ones)."""

    def __init__(self, num_envs: int, gamma: float, clip: float = 10.0):
        self.gamma, self.clip, self.ret = gamma, clip, np.zeros(num_envs)
        self.count, self.mean, self.var = 1e-4, 0.0, 1.0

    def __call__(self, rewards: np.ndarray, dones: np.ndarray) -> np.ndarray:
        """``rewards``, ``dones`` (T, E) of one iteration -> scaled rewards (T, E)."""
        returns = np.zeros(rewards.shape)
        for t in range(len(rewards)):
            returns[t] = self.ret = self.ret * self.gamma + rewards[t]
            self.ret = np.where(dones[t], 0.0, self.ret)  # an episode's return ends with it
        # merge the batch's mean and variance into the running ones (Chan et al.'s parallel update)
        batch_mean, batch_var, n = returns.mean(), returns.var(), returns.size
        delta, total = batch_mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.count = total
        return np.clip(rewards / math.sqrt(self.var + 1e-8), -self.clip, self.clip)

    def reset(self) -> None:
        """Zero the running returns: every env's episode was cut (an evaluation reset the shared workers)."""
        self.ret[:] = 0.0

    def state_dict(self) -> dict:
        return {"ret": torch.from_numpy(self.ret), "stats": torch.tensor([self.count, self.mean, self.var])}

    def load_state_dict(self, state: dict) -> None:
        self.ret = state["ret"].numpy().copy()
        self.count, self.mean, self.var = (float(x) for x in state["stats"])


# ================================================================================================================
# Returns: chunk-level GAE and the critic's fit
# ================================================================================================================
def gae(rewards, values, next_values, terminated, truncated, gamma: float, lam: float):
    """Chunk-level GAE over (T, E) arrays; returns (advantages, returns = advantages + values).

    ``next_values[t]`` is V of the observation after step t. Both episode ends are terminal, with value 0:
    ``terminated`` (success, reward 1) and ``truncated`` (the protocol's step limit reached without success: in
    LIBERO the limit is part of the task, an episode not solved by then scores 0, and the critic sees the elapsed
    fraction t / limit, so the value of reaching it is known to be 0). Bootstrapping a time-out from a critic
    let V float up to the success value everywhere and the advantage of success over failure vanish. Only the
    iteration's last step of an episode still running (a cut, not an end) bootstraps from ``next_values``."""
    T = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in reversed(range(T)):
        alive = 1 - torch.maximum(terminated[t], truncated[t])
        delta = rewards[t] + gamma * alive * next_values[t] - values[t]
        last = delta + gamma * lam * alive * last
        advantages[t] = last
    return advantages, advantages + values


def bootstrap_values(batch: dict, obs: dict, critic: Callable, size: int, device):
    """V(s, t) of every step (``obs``: the batch's observations flattened to (T E, ...)) and V of the observation
    after each step (the next step's, or for the last step the observation the iteration stopped at; gae ignores
    it where the episode ended)."""
    T, E = batch["rewards"].shape
    values = batched(critic, obs, size, device).view(T, E)
    next_values = torch.zeros(T, E)
    next_values[:-1] = values[1:]
    next_values[-1] = batched(critic, batch["next_obs"], size, device)
    return values, next_values


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R): 1 when the critic predicts the returns, 0 when it predicts only their mean, < 0
    when worse than that (NaN when the returns do not vary)."""
    var = returns.var().item()
    return float("nan") if var == 0 else 1.0 - (returns - values).var().item() / var


# ================================================================================================================
# Update schedule: minibatches, advantages, learning rate
# ================================================================================================================
def minibatches(n: int, size: int, device) -> list[torch.Tensor]:
    """One epoch's minibatches: a random permutation of 0..n-1 cut into ``n // size`` full minibatches (at least
    one), the remainder dropped as in DPPO, so that no minibatch is too small to normalise its advantages over."""
    perm = torch.randperm(n).to(device)
    return [perm[s : s + size] for s in range(0, max(n - size, 0) + 1, size)]


def normalize_advantages(adv: torch.Tensor) -> torch.Tensor:
    """(A - mean) / std over a minibatch; a single element (std undefined) becomes 0."""
    if adv.numel() < 2:
        return adv - adv.mean()
    return (adv - adv.mean()) / (adv.std() + 1e-8)


def actor_lr_at(args: dict, iteration: int) -> float:
    """The actor learning rate of the iteration that starts after ``iteration`` completed ones: --actor-lr, held
    until round(--actor-lr-decay-start x num_iterations) (0 with --no-constant-lr), then a cosine to --actor-lr-min
    at the last iteration."""
    lr, lr_min, n = args["actor_lr"], args.get("actor_lr_min", 1e-5), args["num_iterations"]
    start = round((args.get("actor_lr_decay_start", 1.0) if args.get("constant_lr", True) else 0.0) * n)
    if iteration < start:
        return lr
    frac = min(1.0, (iteration + 1 - start) / (n - start))
    return lr_min + (lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * frac))


# ================================================================================================================
# Evaluation under the protocol, in-run and final
# ================================================================================================================
def evaluate_policy(venv: ve.VectorLiberoEnv, act: Callable, episodes: int, seed: int, replan_steps: int,
                    record: bool = False, stop: Optional[Callable[[], bool]] = None) -> dict:  # fmt: skip
    """Success rate and mean length of ``act(obs, generators) -> (B, T, 7)`` over protocol episodes 0..episodes-1,
    and ``successes``, each episode's outcome (0/1) in episode order (episode e starts from init state e % 50).

    Episode e draws its policy noise from its own generator, seeded by (seed, e): its outcome depends neither on
    the worker count nor on the training RNG, which is left where it was. ``record``: also ``action_std``, the
    per-timestep std of the actions across the successful trajectories, averaged over steps and axes (analyze.py's
    consistency, the paper's Fig. 7)."""
    learned = ve.LearnedPolicy(act, replan_steps, venv.obs_mode, 0, seed=seed)
    results = ve.run_episodes(venv, learned, range(episodes), seed, replan_steps, record=record,
                              render=venv.obs_mode == "rgb", reset_policy=learned.reset, stop=stop)  # fmt: skip
    stats = {"success_rate": float(np.mean([r.success for r in results])),
             "episode_length": float(np.mean([r.length for r in results])),
             "successes": [int(r.success) for r in sorted(results, key=lambda r: r.episode)]}  # fmt: skip
    if record:
        actions = [np.stack([s["action"] for s in r.steps]) for r in results if r.success]
        spread = analyze.action_consistency(actions)["mean_std"] if len(actions) >= 2 else None
        stats["action_std"] = float(np.mean(spread)) if spread is not None else float("nan")
    return stats


def evaluate_modes(venv: ve.VectorLiberoEnv, acting: Callable, modes, episodes: int, seed: int, replan_steps: int,
                   record_mode: Optional[str] = None, stop: Optional[Callable[[], bool]] = None,
                   partial_path: Optional[str] = None) -> dict:  # fmt: skip
    """{mode: :func:`evaluate_policy` stats} of ``acting(mode)`` over the same episodes, mode after mode. ``stop()``
    (a pre-emption) ends it within one chunk step (``ve.Interrupted``); with ``partial_path`` every finished mode is
    kept there (atomically) and a rerun evaluates only the modes missing from it."""
    out = {}
    if partial_path is not None and os.path.exists(partial_path):
        with open(partial_path) as f:
            out = {m: r for m, r in json.load(f).items() if m in modes}
        print(f"evaluation: {', '.join(out)} kept from {partial_path}")
    for mode in modes:
        if mode not in out:
            out[mode] = evaluate_policy(venv, acting(mode), episodes, seed, replan_steps, mode == record_mode, stop)
            if partial_path is not None:
                run_utils.write_json(partial_path, out)
    return {m: out[m] for m in modes}


def eval_due(args, iteration: int) -> bool:
    """Whether an in-run evaluation follows ``iteration`` completed iterations (0: the BC start)."""
    if args.eval_episodes <= 0:
        return False
    return iteration == 0 or (args.eval_every and iteration % args.eval_every == 0) or iteration == args.num_iterations


def in_run_evaluation(run_eval: Callable, modes, logger, iteration: int, env_steps: int, args, checkpoint: Callable,
                      preemption) -> int:  # fmt: skip
    """The evaluation due after ``iteration`` completed iterations, logged; returns ``iteration`` (the checkpoint's
    ``evaluated_at``). A pre-emption during it writes ``checkpoint("latest.pt")`` without it and exits; the resumed run
    sees ``evaluated_at`` behind its iteration and evaluates that iteration first."""
    try:
        log_evaluation(logger, iteration, env_steps, run_eval(modes, args.eval_episodes), args.eval_mode)
    except ve.Interrupted:
        checkpoint("latest.pt")
        preemption.exit()
    return iteration


def scalar_stats(stats: dict) -> dict:
    """The numbers of an evaluation's stats for the metrics log (the per-episode list stays in final_eval.json)."""
    return {k: v for k, v in stats.items() if not isinstance(v, list)}


def log_evaluation(logger, step: int, env_steps: int, results: dict, eval_mode: str) -> None:
    """An in-run evaluation {mode: stats}: the evaluated mode's under eval/ (the learning curve), every mode's under
    eval_<mode>/, and one printed line."""
    flat = {f"eval/{k}": v for k, v in scalar_stats(results[eval_mode]).items()}
    flat.update({f"eval_{m}/{k}": v for m, stats in results.items() for k, v in scalar_stats(stats).items()})
    logger.log(step, env_steps=env_steps, **flat)
    rates = ", ".join(f"{m} {r['success_rate']:.3f}" for m, r in results.items())
    print(f"iteration {step}{' (BC start)' if step == 0 else ''}: eval success {rates}")


def write_final_evaluation(path: str, logger, results: dict, iteration: int, env_steps: int, args) -> None:
    """The end-of-run evaluation of every action mode over the same episodes: final_eval.json, metrics, a table."""
    episodes = args.final_eval_episodes
    run_utils.write_json(path, {"iteration": iteration, "env_steps": env_steps, "eval_mode": args.eval_mode,
                                "episodes": episodes, "seed": args.seed, **results})  # fmt: skip
    flat = {f"final_{m}/{k}": v for m, stats in results.items() for k, v in scalar_stats(stats).items()}
    logger.log(iteration, env_steps=env_steps, **flat)
    for m, r in results.items():
        spread = f", action std {r['action_std']:.4f}" if "action_std" in r else ""
        print(f"final ({episodes} episodes) {m:>6}: success {r['success_rate']:.3f}, length "
              f"{r['episode_length']:.1f}{spread}")  # fmt: skip


# ================================================================================================================
# Tensor plumbing
# ================================================================================================================
def to_device(obs: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in obs.items()}


def index_obs(obs: dict, idx) -> dict:
    return {k: v[idx] for k, v in obs.items()}


@torch.no_grad()
def batched(fn: Callable, obs: dict, size: int, device) -> torch.Tensor:
    """Apply ``fn`` to observation tensors (CPU or already on ``device``) in pieces; results concatenated on the
    CPU."""
    n = len(next(iter(obs.values())))
    return torch.cat(
        [fn(to_device(index_obs(obs, slice(i, i + size)), device)).float().cpu() for i in range(0, n, size)]
    )


def check_finite(named: dict) -> Optional[str]:
    """Name of the first tensor with a NaN or inf, else None."""
    for name, tensor in named.items():
        if tensor is not None and not torch.isfinite(tensor).all():
            return name
    return None


def mean_stats(stats: dict) -> dict:
    """Per-minibatch 0-d tensors -> their means as Python floats, read back from the device at once."""
    return {k: torch.stack(v).double().mean().item() for k, v in stats.items() if v}
