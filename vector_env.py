"""vector_env.py — LIBERO environments over subprocess workers, and the evaluation protocol as code.

* :class:`VectorLiberoEnv`: environments grouped over worker processes (several per process, stepped one after the
  other), with worker failures surfaced as :class:`EnvWorkerError` (naming the env, with the child's traceback)
  and a memory estimate checked before any worker starts (:func:`check_memory`);
* :func:`run_episodes`: protocol episodes over a vector env, episode ``e`` from env seed ``seed + e`` and init state
  ``e % 50`` (or the layout sampled from that seed) in whichever worker runs it;
* :class:`LearnedPolicy` and :func:`episode_generator`: a learned policy's noise drawn per episode, so its actions
  depend neither on the worker count nor on what shares its batch; :func:`evaluate_success` for training scripts.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from libero_env import LiberoEnv, configure_rendering, stack_obs
from libero_tasks import LAYOUTS, NUM_INIT_STATES, SAMPLED, Task


class Interrupted(RuntimeError):
    """:func:`run_episodes` stopped before its episodes were done because its ``stop()`` said so (pre-emption)."""


class EnvWorkerError(RuntimeError):
    """An environment worker process raised, died or stopped answering."""


# ----------------------------------------------------------------------------------------------------------------
# Vector environment over subprocess workers
# ----------------------------------------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """Linux: the kernel SIGKILLs this process when its parent dies, so a killed run leaves no orphans."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _worker(conn, task: Task, env_ids: list[int], env_kwargs: dict) -> None:
    """One worker process: the environments ``env_ids`` (constructed here, stepped one after the other)."""
    _die_with_parent()
    # Ctrl-C, SLURM's pre-emption signal and SIGTERM are the parent's to handle: SLURM, `kill -- -PGID` and a
    # terminal signal every process of the job or group, and a training parent finishes its iteration and writes
    # its checkpoint with these workers still stepping. The workers end with the parent: its exit closes them
    # (_close_open_vector_envs), or the kernel's parent-death SIGKILL above when it is killed.
    for sig in (signal.SIGINT, signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    envs: dict[int, LiberoEnv] = {}
    try:
        for i in env_ids:
            try:
                envs[i] = LiberoEnv(task, **env_kwargs)
            except Exception:  # noqa: BLE001 - construction failed: the parent names the env
                conn.send(("error", i, traceback.format_exc()))
                return
        conn.send(("ok", None, None))
        while True:
            cmd, calls = conn.recv()
            if cmd == "close":
                break
            results, failed = [], None
            for i, args in calls:  # (env id, arguments) in the order the parent asked
                try:
                    results.append(getattr(envs[i], cmd)(*args))
                except Exception:  # noqa: BLE001 - every error goes to the parent with its env and traceback
                    failed = ("error", i, traceback.format_exc())
                    break
            conn.send(failed or ("ok", None, results))
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        pass
    finally:
        for env in envs.values():
            with contextlib.suppress(Exception):
                env.close()
        conn.close()


_OPEN_VECTOR_ENVS: weakref.WeakSet = weakref.WeakSet()


def _close_open_vector_envs() -> None:
    """At interpreter exit, before multiprocessing's own exit handler: close every vector env still open. That
    handler would SIGTERM the daemonic workers and wait for them, and the workers ignore SIGTERM."""
    for venv in list(_OPEN_VECTOR_ENVS):
        venv.close()


def split_envs(num_envs: int, num_workers: int) -> list[list[int]]:
    """Env ids 0..num_envs-1 in contiguous groups, one per worker, sizes differing by at most one."""
    bounds = np.linspace(0, num_envs, num_workers + 1).round().astype(int)
    return [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]


def default_num_workers(num_envs: int) -> int:
    """One worker per CPU core this process may use (never more workers than envs)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(num_envs, cores))


# Resident memory of the envs (benchmarks/env_speed.py --grouped-only, LIBERO-Object 0, state mode, 2026-12-02): 16
# envs grouped on 2 workers held 941 MB per env (15.1 GB), 8 on 2 workers 1101 MB (8.8 GB), one env per process 1951
# MB: ~0.8 GB per env (its compiled model alone is 271 MB) and ~1.3 GB per worker interpreter.
ENV_MEMORY_GB = 0.8
WORKER_MEMORY_GB = 1.3
CPU_RECIPE = "--num-envs 16 --num-steps 140 --minibatch-size 2800"  # the 2-core recipe (docs/convergence.md), ~15 GB


class ResourceError(ValueError):
    """The run cannot fit this machine (raised before any worker starts)."""


def env_memory_gb(num_envs: int, num_workers: Optional[int] = None) -> float:
    """Estimated resident memory of ``num_envs`` envs over ``num_workers`` workers (default: one per core), GB."""
    return num_envs * ENV_MEMORY_GB + (num_workers or default_num_workers(num_envs)) * WORKER_MEMORY_GB


def available_memory_gb() -> float:
    """Memory this job may still use, GB: the machine's MemAvailable, capped by the job's cgroup limit (SLURM sets
    one); ``LIBERO_MEMORY_GB`` overrides (to plan a run for another machine)."""
    if os.environ.get("LIBERO_MEMORY_GB"):
        return float(os.environ["LIBERO_MEMORY_GB"])
    have = float("inf")
    with contextlib.suppress(OSError):
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                have = int(line.split()[1]) / 2**20
    with contextlib.suppress(OSError, ValueError):  # cgroup v2: the job's limit less what it already uses
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            used = int(open("/sys/fs/cgroup/memory.current").read())
            have = min(have, (int(limit) - used) / 2**30)
    return have


def check_memory(num_envs: int, num_workers: Optional[int] = None, flag: str = "--num-envs") -> None:
    """Raise :class:`ResourceError`, naming the largest env count that fits, when the envs cannot fit in memory."""
    need, have = env_memory_gb(num_envs, num_workers), available_memory_gb()
    if need <= have:
        return
    fits = [n for n in range(num_envs - 1, 0, -1) if env_memory_gb(n, min(num_workers, n) if num_workers else None)
            <= have]  # fmt: skip
    advice = f"use {flag} {fits[0]} or fewer" if fits else "not even one env fits: free memory or use a larger machine"
    raise ResourceError(
        f"{num_envs} environments need ~{need:.0f} GB of memory (~{ENV_MEMORY_GB} GB each, "
        f"{WORKER_MEMORY_GB} GB per worker process) but {have:.0f} GB are available; {advice} (on "
        f"a 2-core CPU machine the recipe's {CPU_RECIPE} needs ~{env_memory_gb(16, 2):.0f} GB)."
    )


class VectorLiberoEnv:
    """``num_envs`` copies of one task in ``num_workers`` subprocesses (one MuJoCo/EGL context per env).

    Envs are grouped contiguously over the workers (default: one worker per CPU core, so 16-50 envs run on a
    2-core machine without 50 interpreters); a worker steps its envs one after the other, and all workers run at
    once. Every call names the environments it addresses (``env_ids``) and, for resets, the init state each one
    starts from, so which episode runs on which init state never depends on the grouping or on which worker
    finished first: the same init states, seeds and actions give the same episodes for any ``num_workers``.
    A worker that raises, dies or does not answer within ``timeout_s`` raises :class:`EnvWorkerError` in the
    parent, naming the env; all workers are then shut down.
    """

    def __init__(self, task: Task, num_envs: int, timeout_s: float = 600.0, num_workers: Optional[int] = None,
                 **env_kwargs):  # fmt: skip
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}.")
        num_workers = default_num_workers(num_envs) if not num_workers else num_workers
        if not 1 <= num_workers <= num_envs:
            raise ValueError(f"num_workers must be in 1..num_envs ({num_envs}), got {num_workers}.")
        check_memory(num_envs, num_workers)  # before any worker starts
        self.task, self.num_envs, self.num_workers, self.timeout_s = task, num_envs, num_workers, timeout_s
        self.obs_mode = env_kwargs.get("obs_mode", "rgb")
        self.groups = split_envs(num_envs, num_workers)
        self.worker_of = {i: w for w, group in enumerate(self.groups) for i in group}
        configure_rendering()  # inherited by the workers' environment
        ctx = mp.get_context("spawn")  # a fresh interpreter per worker: no inherited EGL/OpenMP state
        self._conns, self._procs, self._closed = [], [], False
        for w, group in enumerate(self.groups):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, task, group, env_kwargs), daemon=True,
                               name=f"libero-env-worker-{w}")  # fmt: skip
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        _OPEN_VECTOR_ENVS.add(self)
        # (re-)registered after multiprocessing's exit handler, which the Pipe above imported: exit handlers run last
        # registered first, so this one closes the workers before that one would wait for them
        atexit.unregister(_close_open_vector_envs)
        atexit.register(_close_open_vector_envs)
        for w in range(num_workers):  # construction errors surface here
            self._recv(w, "construct")

    # -- plumbing ------------------------------------------------------------------------------------------------
    def _describe(self, w: int) -> str:
        group, pid = self.groups[w], self._procs[w].pid
        envs = f"env {group[0]}" if len(group) == 1 else f"envs {group[0]}-{group[-1]}"
        return f"env worker {w} (pid {pid}, {envs})"

    def _recv(self, w: int, cmd: str):
        conn, proc, deadline = self._conns[w], self._procs[w], time.monotonic() + self.timeout_s
        while True:
            try:
                if conn.poll(0.05):
                    status, env_id, payload = conn.recv()
                    break
            except (EOFError, OSError):
                status, env_id, payload = "died", None, None
                break
            if not proc.is_alive():
                status, env_id, payload = "died", None, None
                break
            if time.monotonic() > deadline:
                self.close()
                raise EnvWorkerError(f"{self._describe(w)} did not answer '{cmd}' within {self.timeout_s:.0f} s.")
        if status == "ok":
            return payload
        self.close()
        if status == "died":
            proc.join(1.0)
            raise EnvWorkerError(f"{self._describe(w)} died (exit code {proc.exitcode}) during '{cmd}'.")
        raise EnvWorkerError(f"env {env_id} (worker {w}, pid {proc.pid}) raised during '{cmd}':\n{payload}")

    def _call(self, env_ids: Sequence[int], cmd: str, args_per_env: Sequence[tuple]) -> list:
        if self._closed:
            raise EnvWorkerError("the vector env is closed.")
        calls: dict[int, list] = {}
        for i, args in zip(env_ids, args_per_env):
            if i not in self.worker_of:
                raise IndexError(f"env id {i} out of range 0-{self.num_envs - 1}.")
            calls.setdefault(self.worker_of[i], []).append((i, args))
        for w, work in calls.items():  # every worker starts before any answer is awaited
            try:
                self._conns[w].send((cmd, work))
            except (BrokenPipeError, OSError):
                self._recv(w, cmd)  # reports the death
        results = {}
        for w, work in calls.items():
            results.update(zip([i for i, _ in work], self._recv(w, cmd)))
        return [results[i] for i in env_ids]

    # -- API -----------------------------------------------------------------------------------------------------
    def reset(self, env_ids: Sequence[int], init_states: Sequence[int], seeds: Sequence[int], render: bool = True):
        """Protocol-reset ``env_ids[j]`` to init state ``init_states[j]`` with seed ``seeds[j]``; list of obs."""
        return self._call(env_ids, "reset", [(int(s), int(sd), render) for s, sd in zip(init_states, seeds)])

    def step_chunk(self, env_ids: Sequence[int], actions: np.ndarray, render: bool = True, record: bool = False):
        """Send ``actions[j]`` (T, 7) to env ``env_ids[j]``; list of :class:`ChunkResult`."""
        return self._call(env_ids, "step_chunk", [(np.asarray(a), render, record) for a in actions])

    # -- asynchronous use, one worker at a time (the pipelined rollout: each worker's envs step while the policy
    # computes for another's) ------------------------------------------------------------------------------------
    def submit(self, env_ids: Sequence[int], cmd: str, args_per_env: Sequence[tuple]) -> int:
        """Send ``cmd`` to the envs ``env_ids``, all of one worker, without waiting; returns that worker, whose
        answer :meth:`receive` collects (one command in flight per worker)."""
        w = self.worker_of[env_ids[0]]
        if any(self.worker_of[i] != w for i in env_ids):
            raise ValueError(f"submit() takes the envs of one worker; {list(env_ids)} span several.")
        try:
            self._conns[w].send((cmd, list(zip(env_ids, args_per_env))))
        except (BrokenPipeError, OSError):
            self._recv(w, cmd)  # reports the death
        return w

    def ready(self, workers: Sequence[int]) -> list[int]:
        """Those of ``workers`` whose answer has arrived, waiting until at least one has (a dead worker counts as
        ready: :meth:`receive` then reports it)."""
        from multiprocessing.connection import wait

        conns = {id(self._conns[w]): w for w in workers}
        deadline = time.monotonic() + self.timeout_s
        while True:
            done = wait([self._conns[w] for w in workers], timeout=0.05)
            if done or any(not self._procs[w].is_alive() for w in workers) or time.monotonic() > deadline:
                return [conns[id(c)] for c in done] or list(workers)

    def receive(self, w: int, cmd: str) -> list:
        """The answer of worker ``w`` to its submitted ``cmd``, one result per env in the order submitted."""
        return self._recv(w, cmd)

    def call(self, name: str, *args, env_ids: Optional[Sequence[int]] = None) -> list:
        """Call a method of :class:`LiberoEnv` in each (or the given) worker."""
        ids = range(self.num_envs) if env_ids is None else env_ids
        return self._call(list(ids), name, [args] * len(ids))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _OPEN_VECTOR_ENVS.discard(self)
        for conn in self._conns:
            with contextlib.suppress(Exception):
                conn.send(("close", None))
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for conn in self._conns:
            conn.close()

    @property
    def pids(self) -> list[int]:
        """Process id of each worker (``groups[w]`` are the envs of worker ``w``)."""
        return [p.pid for p in self._procs]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


# ----------------------------------------------------------------------------------------------------------------
# The evaluation protocol as code
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class EpisodeResult:
    episode: int
    init_state: int
    seed: int
    success: bool
    length: int  # steps after the wait steps
    steps: list = field(default_factory=list)  # recorded per-step dicts (record=True)


def episode_init_state(episode: int, layouts: str = "protocol") -> int:
    """Episode e uses init state e (cycling after the 50 fixed states), or a layout sampled from its seed."""
    if layouts not in LAYOUTS:
        raise ValueError(f"layouts must be one of {', '.join(LAYOUTS)}, got '{layouts}'.")
    return SAMPLED if layouts == "sampled" else episode % NUM_INIT_STATES


def run_episodes(
    venv: VectorLiberoEnv,
    policy: Callable,
    episodes: Iterable[int],
    seed: int = 0,
    replan_steps: int = 8,
    record: bool = False,
    render: bool = True,
    on_episode_end: Optional[Callable[[EpisodeResult], None]] = None,
    reset_policy: Optional[Callable[[list[int], list[int]], None]] = None,
    layouts: str = "protocol",
    stop: Optional[Callable[[], bool]] = None,
) -> list[EpisodeResult]:
    """Run protocol episodes over a vector env; results sorted by episode.

    Episode ``e`` starts with env seed ``seed + e`` whichever worker runs it, from init state ``e % 50``
    (``layouts="protocol"``) or from the layout LIBERO samples from that seed (``"sampled"``, init state SAMPLED).
    ``episodes`` is consumed lazily, one episode each time a worker is free, so a generator may stop early (a
    collection that has enough successes). Each query, ``policy(obs_batch, env_ids) -> (B, T, 7)`` returns an
    action chunk per active env, of which the first ``replan_steps`` run open loop (fewer when the episode ends).
    Episodes that end on the same step are all counted. ``reset_policy(env_ids, episodes)`` is called when envs
    start new episodes (stateful policies). ``stop()`` is asked before every chunk step: True raises
    :class:`Interrupted` (a pre-empted job stops within one chunk step).
    """
    episode_init_state(0, layouts)  # an unknown split fails before any env is reset
    upcoming = iter(episodes)
    active: dict[int, dict] = {}
    results: list[EpisodeResult] = []

    def start(env_ids: list[int]) -> None:
        pairs = [(i, e) for i, e in zip(env_ids, upcoming)]  # zip stops when the iterator does
        if not pairs:
            return
        ids, eps = [i for i, _ in pairs], [e for _, e in pairs]
        inits = [episode_init_state(e, layouts) for e in eps]
        obs = venv.reset(ids, inits, [seed + e for e in eps], render=render)
        for i, e, o in zip(ids, eps, obs):
            active[i] = {"episode": e, "obs": o, "steps": []}
        if reset_policy is not None:
            reset_policy(ids, eps)

    start(list(range(venv.num_envs)))
    while active:
        if stop is not None and stop():
            raise Interrupted(f"stopped after {len(results)} episodes")
        env_ids = sorted(active)
        chunks = np.asarray(policy(stack_obs([active[i]["obs"] for i in env_ids]), env_ids))
        outs = venv.step_chunk(env_ids, chunks[:, :replan_steps], render=render, record=record)
        finished = []
        for i, out in zip(env_ids, outs):
            state = active[i]
            state["obs"] = out.obs
            if record:
                state["steps"].extend(out.records)
            if out.done or out.truncated:
                e = state["episode"]
                result = EpisodeResult(e, episode_init_state(e, layouts), seed + e, out.done, out.t, state["steps"])
                results.append(result)
                if on_episode_end is not None:
                    on_episode_end(result)
                finished.append(i)
        for i in finished:
            del active[i]
        if finished:
            start(finished)
    return sorted(results, key=lambda r: r.episode)


def episode_generator(seed: int, episode: int):
    """The noise stream of episode ``episode`` of a run seeded ``seed``: a CPU torch.Generator seeded by the pair,
    so an episode's actions depend neither on the worker count nor on what else shares its batch."""
    import torch  # (only learned policies need it: the simulator side of this module runs without torch)

    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, episode]).generate_state(1)[0]))


class LearnedPolicy:
    """:func:`run_episodes`' policy interface around a learned policy's ``act(obs, generators) -> (B, T, 7)``: every
    episode draws its policy noise from its own generator (:func:`episode_generator`), made when the episode starts
    (``reset_policy=learned.reset``)."""

    needs_privileged = False

    def __init__(self, act, replan_steps: int, obs_mode: str, image_size: int, info: Optional[dict] = None,
                 seed: int = 0):  # fmt: skip
        self.act, self.replan_steps, self.obs_mode, self.info = act, replan_steps, obs_mode, info or {}
        self.image_size = image_size  # the camera size the policy was trained on (evaluate.py renders at it)
        self.seed, self.generators = seed, {}

    def reset(self, env_ids: list[int], episodes: list[int]) -> None:
        for i, e in zip(env_ids, episodes):
            self.generators[i] = episode_generator(self.seed, e)

    def __call__(self, obs: dict, env_ids) -> np.ndarray:
        return self.act(obs, [self.generators[i] for i in env_ids])


def evaluate_success(venv: VectorLiberoEnv, act: Callable, episodes: int, seed: int, replan_steps: int) -> dict:
    """Success rate and mean episode length of a deterministic ``act(obs) -> (B, T, 7)`` over protocol episodes
    0..episodes-1: the periodic evaluation of the training scripts."""
    results = run_episodes(
        venv, lambda obs, env_ids: act(obs), range(episodes), seed, replan_steps, render=venv.obs_mode == "rgb"
    )
    return {
        "success_rate": float(np.mean([r.success for r in results])),
        "episode_length": float(np.mean([r.length for r in results])),
    }
