"""Record scripted LIBERO-Spatial demonstrations as a LeRobot dataset: resumable, in parallel.

    MUJOCO_GL=egl python -m eqx_pi05.eval.record OUT_DIR --tasks 0 --episodes-per-task 50 --workers 2

Each attempt starts from a scene drawn by the task's own placement sampler from a seed derived from
(`--seed`, task, attempt) — never from the suite's 50 fixed initial states, so an evaluation on those
states runs on placements the policy never saw. After the evaluation protocol's settle steps
(not recorded), a scripted controller reads the target bowl's and the plate's positions from the
simulator, grasps the bowl by its rim, carries it over the plate and lets go.

Every finished attempt is appended to OUT_DIR/recording/attempts.jsonl (its episode, if kept, to
recording/episodes/ first), so a killed run resumes where it stopped: `--resume` skips finished
attempts and goes on until each task has `--episodes-per-task` successes (or `--max-attempts-per-task`
attempts). Failed attempts are kept only with `--keep-failures` (their `success` is in attempts.jsonl
and, for each dataset episode, in meta/episode_success.jsonl). When every task is done, the LeRobot
v2.0 dataset (the layout of `physical-intelligence/libero`), tokenizer.model and norm_stats.json are
assembled into OUT_DIR from the kept episodes in (task, attempt) order, whatever the worker count.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import pathlib
import shutil
import time
from typing import Annotated

import numpy as np
import tyro
from jaxtyping import Float
from tqdm import tqdm

from eqx_pi05.data.lerobot_write import Episode
from eqx_pi05.data.make_demo_dataset import LIBERO_SPATIAL_TASKS, write_demo_dataset

SETTLE_STEPS = 10  # the evaluation's dummy steps while objects fall into place (not recorded)
RIM_OFFSET = np.array([0.0, 0.05, 0.0])  # eef above the bowl's rim, not its hollow centre
FPS = 20.0


@dataclasses.dataclass(frozen=True)
class RecordConfig:
    """What makes a recording. A resume must match its seed and keep_failures; tasks may change
    (attempts are kept per task), and so may episodes_per_task, workers and the attempt cap."""

    tasks: tuple[int, ...] = tuple(range(10))
    """LIBERO-Spatial task indices to record."""
    seed: int = 0
    """Root of the per-attempt placement seeds."""
    keep_failures: bool = False
    """Keep failed attempts in the dataset too (marked in meta/episode_success.jsonl)."""
    suite: str = "libero_spatial"
    max_frames: int = 220
    """Frames per attempt at most (LIBERO-Spatial's evaluation limit; tests record shorter attempts)."""
    action_noise: float = 0.0
    """Std of a slowly varying perturbation added to the executed translation while the arm moves between
    targets (DART-style, fading to 0 within 5 cm of a target); the recorded action stays the controller's
    clean command at the perturbed state, so the demonstrations show how to get back on course."""

    def __post_init__(self):
        bad = [t for t in self.tasks if not 0 <= t < len(LIBERO_SPATIAL_TASKS)]
        if bad or not self.tasks:
            raise ValueError(f"--tasks: expected indices in 0..{len(LIBERO_SPATIAL_TASKS) - 1}, got {list(self.tasks)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"--tasks: repeated index in {list(self.tasks)}")
        if self.max_frames < 1:
            raise ValueError(f"--max-frames: expected ≥ 1, got {self.max_frames}")
        if not 0.0 <= self.action_noise <= 1.0:
            raise ValueError(f"--action-noise: expected a std in [0, 1] (action units), got {self.action_noise}")
        if self.suite != "libero_spatial":
            raise ValueError(f"suite: only libero_spatial has a scripted recorder, got {self.suite!r}")


def attempt_seed(seed: int, task: int, attempt: int) -> int:
    """The placement seed of one attempt: fixed by (seed, task, attempt), not by the worker that runs it."""
    return int(np.random.SeedSequence([seed, task, attempt]).generate_state(1)[0])


# ---------------------------------------------------------------------------------------------
# One attempt, in a worker process (one simulator per task, reused across its attempts).

_ENVS: dict = {}


def _env(task_index: int):
    from eqx_pi05.eval import sim  # the `libero` extra; imported in the worker only

    if task_index not in _ENVS:
        tasks = sim.suite_tasks("libero_spatial")
        _ENVS[task_index] = sim.LiberoEnv(tasks[task_index])
    return _ENVS[task_index]


def run_attempt(task_index: int, seed: int, max_frames: int, action_noise: float = 0.0) -> tuple[Episode, bool, float]:
    """One scripted attempt from the sampled scene of `seed`: (episode, success, seconds)."""
    start = time.perf_counter()
    env = _env(task_index)
    obs = env.reset_sampled(seed)
    noise = NoiseProcess(action_noise, np.random.default_rng(seed))
    episode, success = scripted_rollout(env, obs, task_index, max_frames, noise)
    return episode, success, time.perf_counter() - start


@dataclasses.dataclass
class NoiseProcess:
    """AR(1) noise on the executed xyz command, stationary std `scale`, fading near the current target."""

    scale: float
    rng: np.random.Generator
    rho: float = 0.9
    fade: float = 0.05  # metres from the target under which the perturbation shrinks linearly to 0
    state: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(3))

    def __call__(self, error: Float[np.ndarray, "3"]) -> Float[np.ndarray, "3"]:
        if self.scale == 0.0:
            return np.zeros(3)
        self.state = self.rho * self.state + np.sqrt(1 - self.rho**2) * self.scale * self.rng.standard_normal(3)
        return self.state * min(1.0, float(np.linalg.norm(error)) / self.fade)


def scripted_rollout(env, obs, task_index: int, max_frames: int,
                     noise: NoiseProcess | None = None) -> tuple[Episode, bool]:
    """Grasp the task's bowl by its rim, carry it over the plate, let go; frames after the settle steps."""
    # eqx_pi05.eval.sim.LiberoEnv exposes images and state only; object positions come from the
    # robosuite env underneath it (LIBERO's `obj_body_id` / `obj_of_interest`).
    inner = env._env
    body_pos = lambda name: np.array(inner.env.sim.data.body_xpos[inner.env.obj_body_id[name]])  # noqa: E731
    bowl_name, plate_name = inner.obj_of_interest[:2]
    done = False
    for _ in range(SETTLE_STEPS):
        obs, done = env.step(np.array([0, 0, 0, 0, 0, 0, -1.0]))
    frames: list[tuple[dict, np.ndarray]] = []

    def act(target: np.ndarray | None, grip: float, steps: int, tol: float = 0.008) -> None:
        nonlocal obs, done
        for _ in range(steps):
            if done or len(frames) >= max_frames:
                return
            action = np.zeros(7)
            action[6] = grip
            if target is not None:
                error = target - obs["state"][:3]
                if np.linalg.norm(error) < tol:
                    return
                action[:3] = np.clip(error * 20.0, -1.0, 1.0)
            frames.append((obs, action))  # the clean command is the label
            executed = action.copy()
            if target is not None and noise is not None:
                executed[:3] = np.clip(action[:3] + noise(error), -1.0, 1.0)
            obs, done = env.step(executed)

    bowl = body_pos(bowl_name) + RIM_OFFSET
    act(bowl + [0, 0, 0.15], -1.0, 60)
    act(bowl + [0, 0, 0.03], -1.0, 40)
    act(None, 1.0, 12)
    act(obs["state"][:3] + [0, 0, 0.15], 1.0, 40)
    plate = body_pos(plate_name) + RIM_OFFSET
    act(plate + [0, 0, 0.15], 1.0, 60)
    act(plate + [0, 0, 0.08], 1.0, 30)
    act(None, -1.0, 15)
    episode = Episode(
        task_index,
        np.stack([o["agentview"] for o, _ in frames]),
        np.stack([o["wrist"] for o, _ in frames]),
        np.stack([o["state"] for o, _ in frames]).astype(np.float32),
        np.stack([a for _, a in frames]).astype(np.float32),
    )
    return episode, done


# ---------------------------------------------------------------------------------------------
# The recording directory: manifest, attempts log, kept episodes.


def _paths(out_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    rec = out_dir / "recording"
    return {"rec": rec, "manifest": rec / "manifest.json", "log": rec / "attempts.jsonl", "episodes": rec / "episodes"}


def read_attempts(out_dir: pathlib.Path) -> list[dict]:
    """Finished attempts; a last line cut by a kill is ignored (its attempt runs again)."""
    log = _paths(out_dir)["log"]
    if not log.exists():
        return []
    rows = []
    for line in log.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def _episode_file(out_dir: pathlib.Path, task: int, attempt: int) -> pathlib.Path:
    return _paths(out_dir)["episodes"] / f"task{task:02d}_attempt{attempt:04d}.npz"


def _save_episode(path: pathlib.Path, episode: Episode) -> None:
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, task_index=episode.task_index, image=episode.image, wrist_image=episode.wrist_image,
                        state=episode.state, actions=episode.actions)
    os.replace(tmp, path)  # a kill leaves either the whole file or none under the final name


def _load_episode(path: pathlib.Path) -> Episode:
    with np.load(path) as z:
        return Episode(int(z["task_index"]), z["image"], z["wrist_image"], z["state"], z["actions"])


def prepare(out_dir: pathlib.Path, config: RecordConfig, resume: bool) -> list[dict]:
    """Check OUT_DIR against `config` before anything is written; returns the finished attempts."""
    paths = _paths(out_dir)
    wanted = dataclasses.asdict(config)
    if paths["manifest"].exists():
        if not resume:
            raise SystemExit(f"{out_dir} already holds a recording ({paths['manifest']}): pass --resume to go on, "
                             "or choose another OUT_DIR")
        have = json.loads(paths["manifest"].read_text())
        default = dataclasses.asdict(RecordConfig())  # a manifest written before a field existed holds its default
        diff = {k: (have.get(k, default[k]), v) for k, v in wanted.items() if k != "tasks" and have.get(k, default[k]) != v}
        if diff:
            raise SystemExit(f"--resume: {paths['manifest']} differs in " +
                             ", ".join(f"{k} (recorded {a!r}, now {b!r})" for k, (a, b) in diff.items()))
        return read_attempts(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise SystemExit(f"{out_dir} exists and is not a recording (no {paths['manifest']}): choose an empty or new OUT_DIR")
    if resume:
        raise SystemExit(f"--resume: {out_dir} holds no recording to resume")
    paths["episodes"].mkdir(parents=True)
    paths["manifest"].write_text(json.dumps(wanted, indent=2))
    return []


def plan(config: RecordConfig, done: list[dict]) -> dict[int, dict]:
    """Per task: successes so far, attempts so far, the next attempt index."""
    state = {t: {"successes": 0, "attempts": 0, "next": 0} for t in config.tasks}
    for row in done:
        s = state.get(row["task"])
        if s is None:
            continue
        s["successes"] += int(row["success"])
        s["attempts"] += 1
        s["next"] = max(s["next"], row["attempt"] + 1)
    return state


def record(
    out_dir: pathlib.Path,
    config: RecordConfig,
    *,
    episodes_per_task: int,
    workers: int = 1,
    max_attempts_per_task: int | None = None,
    resume: bool = False,
) -> dict:
    """Record until every task has `episodes_per_task` successes (or its attempt cap); then assemble."""
    if episodes_per_task < 1:
        raise ValueError(f"--episodes-per-task: expected ≥ 1, got {episodes_per_task}")
    if workers < 1:
        raise ValueError(f"--workers: expected ≥ 1, got {workers}")
    max_attempts = max_attempts_per_task or 3 * episodes_per_task
    if max_attempts < episodes_per_task:
        raise ValueError(f"--max-attempts-per-task {max_attempts} < --episodes-per-task {episodes_per_task}")
    out_dir = pathlib.Path(out_dir)
    state = plan(config, prepare(out_dir, config, resume))
    _run_attempts(out_dir, config, state, episodes_per_task, max_attempts, workers)
    short = {t: s for t, s in state.items() if s["successes"] < episodes_per_task}
    if short:
        print("attempt cap reached before the target: " +
              ", ".join(f"task {t} {s['successes']}/{episodes_per_task} in {s['attempts']} attempts" for t, s in short.items()))
    assemble(out_dir, config, episodes_per_task)
    return state


def _run_attempts(out_dir: pathlib.Path, config: RecordConfig, state: dict[int, dict], episodes_per_task: int,
                  max_attempts: int, workers: int) -> None:
    """Keep `workers` attempts in flight until each task has its successes or its cap; log each as it ends."""

    def next_attempt(futures: dict) -> tuple[int, int] | None:
        for t in config.tasks:
            flying = sum(1 for ft, _ in futures.values() if ft == t)
            s = state[t]
            if s["successes"] + flying < episodes_per_task and s["attempts"] + flying < max_attempts:
                s["next"] += 1
                return t, s["next"] - 1
        return None

    bar = tqdm(total=episodes_per_task * len(config.tasks), desc="recording (successful episodes)", unit="ep",
               initial=sum(min(s["successes"], episodes_per_task) for s in state.values()), dynamic_ncols=True)
    context = multiprocessing.get_context("spawn")  # MuJoCo/EGL state must not be forked
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool, _paths(out_dir)["log"].open("a") as log:
        futures: dict = {}

        def fill() -> None:
            while len(futures) < workers and (ta := next_attempt(futures)) is not None:
                futures[pool.submit(run_attempt, ta[0], attempt_seed(config.seed, *ta), config.max_frames,
                                    config.action_noise)] = ta

        fill()
        while futures:
            finished, _ = concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                t, a = futures.pop(future)
                episode, success, seconds = future.result()  # a simulator error stops the run (resumable)
                _log_attempt(out_dir, log, config, t, a, episode, success, seconds)
                state[t]["attempts"] += 1
                state[t]["successes"] += int(success)
                if success and state[t]["successes"] <= episodes_per_task:
                    bar.update(1)
                bar.set_postfix(attempts=sum(s["attempts"] for s in state.values()),
                                failed=sum(s["attempts"] - s["successes"] for s in state.values()), last_s=f"{seconds:.0f}")
            fill()
    bar.close()


def _log_attempt(out_dir, log, config: RecordConfig, task: int, attempt: int, episode: Episode, success: bool,
                 seconds: float) -> None:
    """The episode file first (if kept), then its line: a kill between the two reruns the attempt."""
    kept = success or config.keep_failures
    if kept:
        _save_episode(_episode_file(out_dir, task, attempt), episode)
    row = {"task": task, "attempt": attempt, "seed": attempt_seed(config.seed, task, attempt), "success": bool(success),
           "frames": len(episode), "kept": kept, "seconds": round(seconds, 2)}
    log.write(json.dumps(row) + "\n")
    log.flush()
    os.fsync(log.fileno())


def assemble(out_dir: pathlib.Path, config: RecordConfig, episodes_per_task: int) -> pathlib.Path:
    """Write the LeRobot dataset, tokenizer and norm stats from the kept episodes, (task, attempt) order.

    At most `episodes_per_task` successful episodes of each task (the first by attempt index), so a
    run with more workers, or one that was resumed, assembles the same dataset.
    """
    rows = sorted(read_attempts(out_dir), key=lambda r: (r["task"], r["attempt"]))
    chosen, count = [], {}
    for r in rows:
        if not r["kept"]:
            continue
        if r["success"]:
            count[r["task"]] = count.get(r["task"], 0) + 1
            if count[r["task"]] > episodes_per_task:
                continue
        chosen.append(r)
    if not chosen:
        raise SystemExit(f"{out_dir}: no episode to assemble (attempts: {len(rows)}, successes: 0)")
    for stale in ("data", "meta"):
        shutil.rmtree(out_dir / stale, ignore_errors=True)  # derived from recording/, rebuilt whole
    episodes = (_load_episode(_episode_file(out_dir, r["task"], r["attempt"])) for r in chosen)
    successes = sum(r["success"] for r in chosen)
    description = f"libero_spatial scripted rollouts (eqx_pi05.eval.record, seed {config.seed}, sampled placements)"
    write_demo_dataset(out_dir, episodes, description, fps=FPS, summary={"successes": successes, "episodes": len(chosen)})
    with (out_dir / "meta" / "episode_success.jsonl").open("w") as f:
        for i, r in enumerate(chosen):
            f.write(json.dumps({"episode_index": i, "task": r["task"], "attempt": r["attempt"], "seed": r["seed"],
                                "success": r["success"]}) + "\n")
    print(f"assembled {out_dir}: {len(chosen)} episodes ({successes} successful), "
          f"{sum(r['frames'] for r in chosen)} frames")
    return out_dir


def main(
    out_dir: Annotated[pathlib.Path, tyro.conf.Positional],
    config: Annotated[RecordConfig, tyro.conf.arg(name="")] = RecordConfig(),
    episodes_per_task: int = 50,
    workers: int = 1,
    max_attempts_per_task: int | None = None,
    resume: bool = False,
) -> None:
    """Record scripted LIBERO-Spatial demonstrations into OUT_DIR (a LeRobot dataset); resumable.

    episodes_per_task: successful episodes wanted per task. workers: simulator processes.
    max_attempts_per_task: stop a task after this many attempts (default 3 × episodes_per_task).
    resume: go on with the recording already in OUT_DIR (its tasks, seed and keep_failures must match).
    """
    record(out_dir, config, episodes_per_task=episodes_per_task, workers=workers,
           max_attempts_per_task=max_attempts_per_task, resume=resume)


if __name__ == "__main__":
    tyro.cli(main)
