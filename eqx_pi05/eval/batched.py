"""Run many episodes: in this process (`num_envs=1`), or in K simulator worker processes whose
observations are batched into one policy call.

Work is cut into chunks of consecutive trials of one task. Every chunk gets a fresh env, and
`Env.reset(trial)` replays the resets of the trials before it (sim.py says why), so which worker
runs which chunk, and which trials a resumed run skips, cannot change an episode. With a policy
whose output for an observation does not depend on the rest of its batch, sequential and batched
runs give identical episodes.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import multiprocessing as mp
import multiprocessing.connection
import pathlib
import time
import traceback
from collections.abc import Callable, Sequence

import numpy as np

from eqx_pi05.eval.rollout import REPLAN_STEPS, Env, EpisodeResult, Policy, drive, episode
from eqx_pi05.eval.sim import Task
from eqx_pi05.eval.video import EpisodeVideo
from eqx_pi05.logs import setup_logging

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Chunk:
    task: Task
    trials: tuple[int, ...]  # ascending
    videos: dict[int, pathlib.Path] = dataclasses.field(default_factory=dict)  # trial -> file stem


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every episode of a run shares."""

    max_steps: int
    replan_steps: int = REPLAN_STEPS
    greyed: tuple[str, ...] = ()  # cameras greyed in videos: the ones the policy does not see


def plan_chunks(
    todo: dict[Task, list[int]], num_envs: int, videos: dict[tuple[int, int], pathlib.Path] | None = None
) -> list[Chunk]:
    """Split each task's trials into consecutive chunks: one per task when sequential, else enough
    that K workers stay busy to the end (≥ 2K chunks), at the price of replayed resets (≈ 2 s per
    skipped trial) for chunks that start late."""
    videos = videos or {}
    tasks = [t for t in todo if todo[t]]
    parts = 1 if num_envs == 1 or not tasks else math.ceil(2 * num_envs / len(tasks))
    chunks = []
    for task in tasks:
        trials = sorted(todo[task])
        for part in np.array_split(np.array(trials), min(parts, len(trials))):
            ts = tuple(int(t) for t in part)
            chunks.append(Chunk(task, ts, {t: videos[(task.index, t)] for t in ts if (task.index, t) in videos}))
    return chunks


def _run_chunk(
    chunk: Chunk, make_env: Callable[[Task], Env], act: Callable[[dict], np.ndarray], settings: Settings,
    on_result: Callable[[EpisodeResult], None],
) -> None:
    env = make_env(chunk.task)
    try:
        for trial in chunk.trials:
            video = EpisodeVideo(chunk.videos[trial], settings.greyed) if trial in chunk.videos else None
            gen = episode(env, chunk.task, trial, settings.max_steps, settings.replan_steps,
                          on_frame=video.add if video else None)
            result = drive(gen, act)
            if video:
                video.finish(result.success)
            on_result(result)
    finally:
        env.close()


def _worker(conn: mp.connection.Connection, make_env: Callable[[Task], Env], settings: Settings, verbose: bool) -> None:
    setup_logging(verbose)  # a spawned process starts unconfigured: quiet like its parent (robosuite's import warnings)

    def act(obs: dict) -> np.ndarray:
        conn.send(("request", obs))
        return conn.recv()

    try:
        while (chunk := conn.recv()) is not None:
            _run_chunk(chunk, make_env, act, settings, lambda r: conn.send(("result", r)))
            conn.send(("done", None))
    except Exception:  # noqa: BLE001 - reported to the parent, which raises
        conn.send(("error", traceback.format_exc()))
    conn.close()


def run_chunks(
    chunks: Sequence[Chunk],
    make_env: Callable[[Task], Env],
    policy: Policy,
    settings: Settings,
    num_envs: int,
    on_result: Callable[[EpisodeResult], None],
    gather_s: float = 0.05,
) -> None:
    """Run every chunk; `on_result` is called in this process as each episode ends.

    Batched: a policy call serves the requests of all workers that have one, waiting up to
    `gather_s` after the first for the other busy workers, so that their observations share a call.
    """
    if num_envs < 1:
        raise ValueError(f"num_envs: expected >= 1, got {num_envs}")
    if num_envs == 1:
        for chunk in chunks:
            _run_chunk(chunk, make_env, lambda obs: _call(policy, [obs])[0], settings, on_result)
        return
    pool = _Pool(chunks, make_env, settings, min(num_envs, len(chunks)), on_result)
    try:
        for i in range(len(pool.conns)):
            pool.assign(i)
        while pool.busy:
            pool.gather(gather_s)
            if pool.requests:
                ids = sorted(pool.requests)
                actions = _call(policy, [pool.requests[i] for i in ids])
                for i, chunk_actions in zip(ids, actions):
                    pool.conns[i].send(chunk_actions)
                pool.requests.clear()
    except BaseException:
        for proc in pool.procs:  # a failed run (or Ctrl-C) need not wait for the workers' episodes
            proc.terminate()
        raise
    finally:
        pool.close()


class _Pool:
    """Simulator worker processes, the chunks still to run, and the policy requests waiting."""

    def __init__(self, chunks, make_env, settings: Settings, workers: int, on_result):
        ctx = mp.get_context("spawn")
        self.conns, self.procs, self.on_result = [], [], on_result
        for i in range(workers):
            parent, child = ctx.Pipe()
            verbose = logging.getLogger().getEffectiveLevel() <= logging.INFO
            proc = ctx.Process(target=_worker, args=(child, make_env, settings, verbose), name=f"sim-worker-{i}", daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        self.pending = collections.deque(chunks)
        self.busy: dict[int, Chunk] = {}
        self.requests: dict[int, dict] = {}

    def assign(self, i: int) -> None:
        if self.pending:
            self.busy[i] = self.pending.popleft()
            self.conns[i].send(self.busy[i])

    def receive(self, i: int) -> None:
        try:
            kind, payload = self.conns[i].recv()
        except EOFError:
            raise RuntimeError(f"simulator worker {i} died (exit code {self.procs[i].exitcode}) while running "
                               f"{self.busy.get(i)}") from None
        if kind == "request":
            self.requests[i] = payload
        elif kind == "result":
            self.on_result(payload)
        elif kind == "done":
            del self.busy[i]
            self.assign(i)
        else:
            raise RuntimeError(f"simulator worker {i} failed on {self.busy.get(i)}:\n{payload}")

    def gather(self, gather_s: float) -> None:
        """Receive until every busy worker has a request, or `gather_s` passed since the first one."""
        waiting = [self.conns[i] for i in self.busy if i not in self.requests]
        deadline = time.monotonic() + gather_s if self.requests else None
        while waiting:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = mp.connection.wait(waiting, timeout)
            if not ready:
                break
            for conn in ready:
                self.receive(self.conns.index(conn))
            if self.requests and deadline is None:
                deadline = time.monotonic() + gather_s
            waiting = [self.conns[i] for i in self.busy if i not in self.requests]

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()


def _call(policy: Policy, observations: list[dict]) -> np.ndarray:
    actions = np.asarray(policy(observations))
    if actions.ndim != 3 or actions.shape[0] != len(observations):
        raise ValueError(f"policy: expected actions (n={len(observations)}, horizon, 7), got {actions.shape}")
    return actions
