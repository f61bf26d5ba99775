"""The EMA in pinned host memory (`--ema-memory host`, issue 14): the step runs without it and it is
updated after the step, leaf by leaf; the run is bit-identical to the EMA on the device, it stays on
the host between steps, saves and resumes, and a device-EMA run resumes with it on the host."""

import dataclasses

import jax
import numpy as np
import pytest
from batches import random_batch
from conftest import random_model, small_config, small_run as small

from eqx_pi05 import checkpoints
from eqx_pi05.cameras import compact
from eqx_pi05.variants import VARIANTS
from eqx_pi05.train.loop import train
from eqx_pi05.train.optimizer import make_optimizer
from eqx_pi05.train.sharding import global_batch, make_mesh, state_shardings
from eqx_pi05.train.state import ema_update, init_state
from eqx_pi05.train.step import StepConfig, jit_train_step

pytestmark = pytest.mark.slow


def _kinds(tree) -> set[str]:
    return {x.sharding.memory_kind for x in jax.tree.leaves(tree)}


def _equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.mark.parametrize("fast_compile", [True, False])
def test_the_ema_lives_on_the_host_and_updates_as_on_the_device(fast_compile):
    """Two steps of `jit_train_step` with the EMA in device memory and in pinned host memory: the same
    params and the same EMA bits (with either set of the step's XLA options), each step's EMA the
    update of its new params; the host EMA stays on the host (its buffers donated to the update), the
    params on the device."""
    train_cfg = VARIANTS["pi05_libero"]
    host = jax.device_get(init_state(random_model(small_config()), make_optimizer(train_cfg.lr, train_cfg.optimizer), ema=True,
                                     seed=0))
    batch = global_batch(compact(random_batch(small_config(), 2, seed=3)), mesh := make_mesh(1))
    states, cfgs = {}, {}
    for memory in ("device", "host"):
        states[memory] = jax.device_put(host, state_shardings(host, mesh, 0, memory))
        cfgs[memory] = dataclasses.replace(StepConfig.of(dataclasses.replace(train_cfg, ema_memory=memory)), fast_compile=fast_compile)
    assert _kinds(states["host"].ema) == {"pinned_host"} and _kinds(states["device"].ema) == {"device"}
    previous = host.ema
    for step in range(2):
        for memory, state in states.items():
            given = state.ema
            states[memory], _ = jit_train_step(state, batch, np.float32(0.0), None, cfg=cfgs[memory], mesh=mesh, min_bytes=0)
            # donated (checked before any numpy view of the EMA exists: a viewed CPU buffer is copied, not donated)
            assert step > 0 or all(x.is_deleted() for x in jax.tree.leaves(given))
        assert _equal(states["host"].params, states["device"].params) and _equal(states["host"].ema, states["device"].ema), step
        # the update of the new params, as numpy computes it (XLA's optimised build may fuse it into one FMA: ≤ 1 ulp)
        expected = ema_update(previous, jax.device_get(states["device"].params), train_cfg.ema_decay)
        for got, want in zip(jax.tree.leaves(states["host"].ema), jax.tree.leaves(expected), strict=True):
            np.testing.assert_array_max_ulp(np.asarray(got), want, maxulp=0 if fast_compile else 1)
        assert _kinds(states["host"].ema) == {"pinned_host"} and _kinds(states["host"].params) == {"device"}, step
        previous = jax.device_get(states["host"].ema)
    assert not _equal(states["host"].ema, states["host"].params)


def test_a_host_ema_run_saves_resumes_and_equals_the_device_run(demo_data, tmp_path):
    run = lambda name, **kw: train(small("pi05_libero", demo_data, tmp_path / name, save_interval=1, **kw))  # noqa: E731
    straight = run("device", num_train_steps=3)
    host = run("host", num_train_steps=2, ema_memory="host") + run("host", num_train_steps=3, ema_memory="host", resume=True)
    mixed = run("mixed", num_train_steps=2) + run("mixed", num_train_steps=3, ema_memory="host", resume=True)
    assert [r["loss"] for r in host] == [r["loss"] for r in mixed] == [r["loss"] for r in straight]
    want = checkpoints.load_trained(tmp_path / "device" / "checkpoints" / "3")[0]  # the EMA
    for name in ("host", "mixed"):
        assert _equal(checkpoints.load_trained(tmp_path / name / "checkpoints" / "3")[0], want), name
