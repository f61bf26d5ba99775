"""Subprocess side of test_train_sharding.py (the device count is fixed when JAX starts).

    python tests/train_sharding_worker.py single OUT           8 host devices, one process: loss and
                                                               grads on one device and on a 2x4 mesh
    python tests/train_sharding_worker.py multi OUT PORT ID    process ID of 2 (4 devices each, gloo
                                                               collectives): one train step on the
                                                               2x4 mesh from this process's rows

Both build the same state (a random small model, seed 0, halved) and the same global batch of 8; the step is
B5's (teacher `self`, lam 1, anchor 0.15, augmentation on) with p = 0.5, so every part of it runs.
"""

import dataclasses
import json
import os
import pathlib
import sys

MODE, OUT = sys.argv[1], pathlib.Path(sys.argv[2])
os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={8 if MODE == 'single' else 4} "
                           "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
TESTS = pathlib.Path(__file__).parent
sys.path[:0] = [str(TESTS), str(TESTS.parent / "benchmarks")]  # conftest's helpers, the shared batch builder

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from batches import random_batch  # noqa: E402
from conftest import random_model, small_config  # noqa: E402

from eqx_pi05.cameras import compact  # noqa: E402
from eqx_pi05.variants import VARIANTS  # noqa: E402
from eqx_pi05.train.optimizer import make_optimizer  # noqa: E402
from eqx_pi05.train.sharding import (  # noqa: E402
    batch_sharding, fsdp_shardings, global_batch, initialize, make_mesh, replicated, state_shardings)
from eqx_pi05.train.state import init_state  # noqa: E402
from eqx_pi05.train.step import StepConfig, jit_train_step, loss_and_grads  # noqa: E402

if MODE == "multi":
    initialize(f"localhost:{sys.argv[3]}", 2, int(sys.argv[4]))  # before anything starts the backend
B, P = 8, jnp.float32(0.5)
cfg = VARIANTS["curric_selfdistill"]
step_cfg = StepConfig.of(cfg)
model = jax.tree.map(lambda x: 0.5 * x, random_model(small_config()))  # every leaf random, moderate activations
state = jax.device_get(init_state(model, make_optimizer(cfg.lr, cfg.optimizer), ema=True, seed=0))
batch = compact(random_batch(small_config(), B, seed=0))
mesh = make_mesh(4)  # 8 devices: ("data", "fsdp") = (2, 4)
shardings = fsdp_shardings(state, mesh, 0)
place = lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda i: np.asarray(x)[i])  # noqa: E731
on_mesh = jax.tree.map(place, state, shardings)


def shard_report(tree):
    """{leaf path: (partition spec, global shape, this process's first shard shape)}."""
    return {jax.tree_util.keystr(p): (str(x.sharding.spec), list(x.shape), list(x.addressable_shards[0].data.shape))
            for p, x in jax.tree_util.tree_leaves_with_path(tree)}


if MODE == "single":
    fn = lambda s, b: loss_and_grads(s, b, P, None, False, step_cfg)  # noqa: E731
    loss, _, grads = jax.jit(fn)(state, batch)
    mesh_fn = jax.jit(fn, in_shardings=(shardings, batch_sharding(mesh)), out_shardings=(replicated(mesh), replicated(mesh), shardings.params))
    mesh_loss, _, mesh_grads = mesh_fn(on_mesh, global_batch(batch, mesh))
    leaves = lambda g: {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(g)}  # noqa: E731
    np.savez(OUT / "single.npz", loss=loss, mesh_loss=mesh_loss, **{f"grad{k}": v for k, v in leaves(grads).items()},
             **{f"mesh{k}": v for k, v in leaves(mesh_grads).items()})
    (OUT / "single.json").write_text(json.dumps(shard_report(mesh_grads)))
else:
    rows = slice(jax.process_index() * B // 2, (jax.process_index() + 1) * B // 2)
    local = jax.tree.map(lambda x: x[rows], batch)
    new_state, metrics = jit_train_step(on_mesh, global_batch(local, mesh), P, None, False, cfg=step_cfg, mesh=mesh, min_bytes=0)
    report = dict(loss=float(metrics["loss"]), grad_norm=float(metrics["grad_norm"]), devices=jax.device_count(),
                  local_devices=jax.local_device_count(), params=shard_report(new_state.params))
    # The same step with the EMA in pinned host memory (--ema-memory host), FSDP-sharded like the params.
    on_host = jax.tree.map(place, state, state_shardings(state, mesh, 0, "host"))
    host_state, _ = jit_train_step(on_host, global_batch(local, mesh), P, None, False,
                                   cfg=dataclasses.replace(step_cfg, ema_on_host=True), mesh=mesh, min_bytes=0)
    pairs = list(zip(jax.tree.leaves(host_state.ema), jax.tree.leaves(new_state.ema), strict=True))
    report["host_ema"] = dict(kinds=sorted({h.sharding.memory_kind for h, _ in pairs}), ema=shard_report(host_state.ema),
                              equal=all(np.array_equal(h.addressable_shards[0].data, d.addressable_shards[0].data) for h, d in pairs))
    (OUT / f"process{jax.process_index()}.json").write_text(json.dumps(report))
