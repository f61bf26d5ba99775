"""Does another mujoco/robosuite render LIBERO-Spatial the same? (issue 12 point 4, README "Simulator versions")

    MUJOCO_GL=egl python benchmarks/sim_versions.py record OUT.npz      # in each environment to compare
    python benchmarks/sim_versions.py compare A.npz B.npz

`record` keeps, for trial 0 of all 10 tasks, both cameras at reset, the state, and the agentview and
state after 10 settle steps + 20 scripted steps; ≈ 2 min on an idle 2-core CPU. Run it in a
throw-away venv (`python -m venv V --system-site-packages; V/bin/pip install mujoco==X robosuite==Y`)
so the shared environment stays as it is.
"""

from __future__ import annotations

import sys

import numpy as np

from eqx_pi05.eval import sim
from eqx_pi05.eval.rollout import SETTLE_ACTION


def record(path: str) -> None:
    out = {"versions": np.array([f"{k}={v}" for k, v in sim.versions().items()])}
    for task in sim.suite_tasks("libero_spatial"):
        env = sim.LiberoEnv(task)
        try:
            obs = env.reset(0)
            out |= {f"t{task.index}_agentview": obs["agentview"], f"t{task.index}_wrist": obs["wrist"],
                    f"t{task.index}_state0": obs["state"]}
            for _ in range(10):
                obs, _ = env.step(SETTLE_ACTION)
            for i in range(20):  # forward and down, gripper closing at the end
                obs, _ = env.step(np.array([0.3, 0.0, -0.3, 0, 0, 0, -1.0 if i < 15 else 1.0]))
            out |= {f"t{task.index}_agentview30": obs["agentview"], f"t{task.index}_state30": obs["state"]}
        finally:
            env.close()
    np.savez_compressed(path, **out)


def compare(path_a: str, path_b: str) -> None:
    a, b = np.load(path_a), np.load(path_b)
    print("A:", *a["versions"], "| B:", *b["versions"])
    print("task | image: pixels that differ %, max |diff|, mean |diff| | state max |diff| at reset, after 30 steps")
    for t in range(10):
        cells = []
        for key in ("agentview", "wrist", "agentview30"):
            d = np.abs(a[f"t{t}_{key}"].astype(int) - b[f"t{t}_{key}"].astype(int))
            cells.append(f"{key} {100 * np.mean(d.max(-1) > 0):.2f}% {d.max()} {d.mean():.3f}")
        s0, s30 = (np.abs(a[f"t{t}_{k}"] - b[f"t{t}_{k}"]).max() for k in ("state0", "state30"))
        print(t, " | ".join(cells), f"| {s0:.1e} {s30:.1e}")


if __name__ == "__main__":
    {"record": record, "compare": compare}[sys.argv[1]](*sys.argv[2:])
