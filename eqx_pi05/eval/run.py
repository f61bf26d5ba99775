"""One evaluation run: removal audit, then the episodes (resumable), then the results files.

The policy is given (evaluate.py builds it from a checkpoint; tests give a stub), so this module
needs neither JAX nor a model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Annotated

import tyro
from tqdm import tqdm

from eqx_pi05 import lock
from eqx_pi05.cameras import CAMERAS
from eqx_pi05.eval import results, sim, video
from eqx_pi05.eval.audit import RemovalAuditError, audit_removal
from eqx_pi05.eval.batched import Settings, plan_chunks, run_chunks
from eqx_pi05.eval.rollout import MAX_STEPS, Env, EpisodeResult, Policy, noise_seed, policy_observation

log = logging.getLogger("eqx_pi05.eval")


def _task_indices(words: list[str]) -> tuple[int, ...] | None:
    """`--tasks 0,3,7` (experiments/closed_loop/run.sh's form), `--tasks 0 3 7`, or `--tasks None`."""
    if words == ["None"]:
        return None
    try:
        return tuple(int(i) for word in words for i in word.split(","))
    except ValueError:
        raise ValueError(f"--tasks {' '.join(words)!r}: expected task indices, e.g. 0 or 0,3,7 or 0 3 7") from None


TaskIndices = Annotated[tuple[int, ...] | None, tyro.constructors.PrimitiveConstructorSpec(
    nargs="*", metavar="{None}|INT[,INT...]", instance_from_str=_task_indices,
    is_instance=lambda x: x is None or isinstance(x, tuple),
    str_from_instance=lambda x: [str(x) if x is None else ",".join(map(str, x))])]


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """LIBERO evaluation with openpi's protocol (SPEC.md §4). evaluate.py's flags are these fields."""

    # Episodes in all, spread evenly over the suite's tasks (500 -> 10 tasks x 50 trials); below the
    # number of tasks, only the first n tasks are evaluated (one episode each).
    n: int = 500
    # LIBERO task suite.
    suite: sim.Suite = "libero_spatial"
    # None: evaluate.py names it outputs/eval/<run name>[_step<N>]_<suite> after the checkpoint.
    output_dir: pathlib.Path | None = None
    # Simulator worker processes whose observations share one policy call (1: all in this process).
    num_envs: int = 1
    # Policy steps per episode after the 10 settle steps; None: the suite's (spatial 220, object 280,
    # goal 300, libero_10 520, libero_90 400).
    max_steps: int | None = None
    # Episodes recorded as MP4 (agentview | wrist, a removed camera greyed; the first trials of the first tasks).
    videos: int = 4
    # Env seed (the reference's 7); also part of the output directory's identity for resuming.
    seed: int = sim.ENV_SEED
    # Task indices of the suite to evaluate, comma- or space-separated ("0" or "0,3,7"); None: all. --n is
    # spread over them.
    tasks: TaskIndices = None

    def __post_init__(self):
        if self.tasks is not None and (not self.tasks or len(set(self.tasks)) != len(self.tasks) or min(self.tasks) < 0):
            raise ValueError(f"--tasks: expected distinct task indices >= 0, got {self.tasks}")
        if self.suite not in MAX_STEPS and self.max_steps is None:
            raise ValueError(f"suite {self.suite!r}: no default max_steps, expected one of {list(MAX_STEPS)} "
                             "or an explicit --max-steps")
        for flag, value, low in (("--n", self.n, 1), ("--num-envs", self.num_envs, 1), ("--videos", self.videos, 0),
                                 ("--max-steps", self.max_steps, 1)):
            if value is not None and value < low:
                raise ValueError(f"{flag} {value}: expected >= {low}")

    @property
    def steps(self) -> int:
        return self.max_steps if self.max_steps is not None else MAX_STEPS[self.suite]


@dataclasses.dataclass(frozen=True)
class PolicyInfo:
    """What the results table says about the policy, and the camera removal its variant implies."""

    variant: str
    backbone: str  # "full-FT", "LoRA", ...
    mechanism: str  # "view_remove (physical)", "view_dropout (zeros)", "none", ...
    checkpoint: str
    view_remove_eval: dict[str, float] = dataclasses.field(default_factory=dict)
    view_dropout_train: dict[str, float] = dataclasses.field(default_factory=dict)
    # --eval-view (data.transforms.EvalView) and what it implies: cameras fed as zeros at eval.
    eval_view: str = "deployed"
    view_dropout_eval: dict[str, float] = dataclasses.field(default_factory=dict)
    assets: str = ""  # where the norm stats and tokenizer came from, and their fingerprint
    policy_batch: int = 1  # rows of every model call (actions depend on it, not on num_envs)

    @property
    def hidden(self) -> tuple[str, ...]:
        """Cameras the policy never reads: removed, or fed as zeros, in every sample."""
        probs = {**self.view_remove_eval, **self.view_dropout_eval}
        return tuple(c for c in CAMERAS if probs.get(c, 0.0) >= 1.0)


# Fields that must match for a rerun to continue an output directory's episodes: everything that can
# change an episode. Not num_envs: the policy's fixed batch makes episodes independent of it.
_RESUME_KEYS = ("suite", "n", "max_steps", "seed", "variant", "checkpoint", "tasks", "eval_view", "policy_batch", "assets")


def _check_resume(out_dir: pathlib.Path, identity: dict) -> None:
    """An output directory continues the evaluation it holds, never another one (reads only)."""
    path = out_dir / "eval_config.json"
    if path.exists():
        before = json.loads(path.read_text())
        diff = {k: (before.get(k), identity[k]) for k in _RESUME_KEYS if before.get(k) != identity[k]}
        if diff:
            raise ValueError(f"{out_dir} holds episodes of another evaluation; differing (before, now): {diff}. "
                             "Use another --output-dir.")


def select_tasks(tasks: list[sim.Task], indices: tuple[int, ...] | None) -> list[sim.Task]:
    """The suite's tasks with these indices, in the given order (all when None)."""
    if indices is None:
        return tasks
    by_index = {t.index: t for t in tasks}
    missing = [i for i in indices if i not in by_index]
    if missing:
        raise ValueError(f"--tasks {','.join(map(str, indices))}: no task {missing} in this suite "
                         f"(indices 0..{len(tasks) - 1})")
    return [by_index[i] for i in indices]


def plan(config: EvalConfig, tasks: Sequence[sim.Task] | None = None,
         make_env: Callable[[sim.Task], Env] | None = None) -> tuple[list[sim.Task], int, dict[int, int]]:
    """(tasks, trials per task, {task index: episodes}) of `config`, or the error of an impossible
    one (`--n` beyond the suite's fixed initial states): checked before a model, a simulator or
    the output directory is touched. The trial count is read from the suite's init-state file
    (a test's `make_env` is asked instead)."""
    tasks = select_tasks(list(tasks) if tasks is not None else sim.suite_tasks(config.suite), config.tasks)
    if make_env is None:
        trials = len(sim.init_states(tasks[0]))
    else:
        env = make_env(tasks[0])
        trials = env.num_trials
        env.close()
    counts = results.episodes_per_task(config.n, len(tasks), trials)
    return tasks, trials, {t.index: c for t, c in zip(tasks, counts)}


@contextlib.contextmanager
def _file_log(path: pathlib.Path):
    """Everything eqx_pi05 logs during the run also goes to `path` (the audit line included)."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("eqx_pi05")
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


def evaluate(
    config: EvalConfig,
    policy: Policy,
    info: PolicyInfo,
    tasks: Sequence[sim.Task] | None = None,
    make_env: Callable[[sim.Task], Env] | None = None,
) -> dict:
    """Audit, run the episodes not yet in OUTPUT/episodes.jsonl, write the results; returns results.json.

    `tasks` / `make_env` default to the real suite and sim.LiberoEnv (tests pass the fake simulator).
    """
    if config.output_dir is None:
        raise ValueError("EvalConfig.output_dir: None; evaluate() writes into a given directory (evaluate.py names one)")
    out = pathlib.Path(config.output_dir)
    tasks, _, planned = plan(config, tasks, make_env)
    identity = {"suite": config.suite, "n": config.n, "max_steps": config.steps, "seed": config.seed,
                "variant": info.variant, "checkpoint": info.checkpoint,
                "tasks": None if config.tasks is None else list(config.tasks), "eval_view": info.eval_view,
                "policy_batch": info.policy_batch, "assets": info.assets}
    _check_resume(out, identity)
    with lock.hold(out, f"evaluate.py {info.variant}"), _file_log(out / "eval.log"):
        return _evaluate(config, policy, info, tasks, make_env, out, identity, planned)


def _audit(policy: Policy, info: PolicyInfo, task: sim.Task, make_env: Callable[[sim.Task], Env]) -> str:
    """The removal audit (eval.audit) on the first observation of `task`'s episode 0, before any episode runs."""
    env = make_env(task)
    try:
        first = policy_observation(env.reset(0), task.language, noise_seed(task.index, 0, 0))
    finally:
        env.close()
    try:
        return audit_removal(policy, first, info.view_remove_eval, info.view_dropout_train, info.view_dropout_eval)
    except RemovalAuditError as e:
        log.error("%s", e)  # the evidence stays in eval.log; no episode runs
        raise


def _evaluate(config, policy, info, tasks, make_env, out, identity, planned) -> dict:
    start = time.perf_counter()
    # Render only the cameras the policy reads (rendering is ~95 % of a CPU step); the audit feeds the
    # hidden ones synthetic frames anyway, and the video greys them.
    rendered = [c for c in CAMERAS if c not in info.hidden] if make_env is None else "the caller's make_env"
    simulator = sim.versions() if make_env is None else "the caller's make_env"
    if isinstance(simulator, dict) and simulator["mujoco"] != sim.REFERENCE_MUJOCO:
        log.warning("mujoco %s: openpi's LIBERO evaluation renders with %s, and frames differ (README, simulator "
                    "versions); pip install mujoco==%s", simulator["mujoco"], sim.REFERENCE_MUJOCO, sim.REFERENCE_MUJOCO)
    make_env = make_env or functools.partial(sim.LiberoEnv, seed=config.seed, cameras=tuple(rendered))
    log.info("evaluation %s", json.dumps({**identity, "num_envs": config.num_envs, "rendered_cameras": rendered,
                                          "output_dir": str(out)}))

    audit_line = _audit(policy, info, tasks[0], make_env)
    log.info(audit_line)
    (out / "eval_config.json").write_text(json.dumps(identity, indent=2) + "\n")

    counts = [planned[t.index] for t in tasks]
    if 0 in counts:
        log.warning("n=%d is below the number of tasks (%d): only the first %d (tasks %s) are evaluated", config.n,
                    len(tasks), config.n, ", ".join(str(t.index) for t, c in zip(tasks, counts) if c))
    done = {(r.task, r.trial) for r in results.load_episodes(out)}
    video.remove_orphans(out / "videos", done)
    todo = {t: [e for e in range(planned[t.index]) if (t.index, e) not in done] for t in tasks}
    remaining = sum(map(len, todo.values()))
    log.info("%d episodes planned, %d already in %s, %d to run", config.n, config.n - remaining,
             results.EPISODES, remaining)
    order = sorted(((e, t.index) for t in tasks for e in range(planned[t.index])))[: config.videos]
    videos = {(ti, e): video.stem(out / "videos", ti, e) for e, ti in order if (ti, e) not in done}
    greyed = info.hidden

    bar = tqdm(total=remaining, desc="episodes", unit="ep")

    def on_result(r: EpisodeResult) -> None:
        results.append_episode(out, r)
        bar.update(1)
        log.info("task %d trial %d: %s after %d steps (%.1f s)%s", r.task, r.trial,
                 "success" if r.success else "failure", r.steps, r.seconds, f" [{r.error}]" if r.error else "")

    try:
        run_chunks(plan_chunks(todo, config.num_envs, videos), make_env, policy,
                   Settings(config.steps, greyed=greyed), config.num_envs, on_result)
    finally:
        bar.close()
    wall = time.perf_counter() - start
    summary = results.summarize(results.load_episodes(out), tasks, planned)
    header = {**identity, "backbone": info.backbone, "mechanism": info.mechanism, "audit": audit_line,
              "tasks_evaluated": sum(c > 0 for c in counts), "num_envs": config.num_envs,
              "rendered_cameras": rendered, "simulator": simulator, "wall_seconds_this_invocation": round(wall, 1),
              "episodes_this_invocation": remaining,
              "episodes_per_hour_this_invocation": round(3600 * remaining / wall, 1) if remaining else None}
    paths = results.write_results(out, summary, header)
    log.info("success %s -> %s", summary["total"]["text"], paths["md"])
    return {**header, **summary}

