"""Train step: (a) wall time on this CPU at the tiny sizes; (b) the full-size step lowered with
abstract shapes (nothing allocated) at batch 32: XLA FLOPs and memory, with and without remat.

    python benchmarks/train_step.py [--runs 5] [--skip-full] [--batch 32]

(a) the real jitted step (augmentation, distillation, clip + AdamW, EMA) of three variants —
pi05_libero (both cameras), curric_selfdistill while p < 1 (student masked per row + teacher), and
selfdistill_only (student compacted wrist-only + teacher) — on the demo model (what `--preset demo`
trains) and on pi05_tiny (the fixture size), batch 8: median steps/s.
(b) FLOPs of loss + grad (the optimizer adds ~0.1 TFLOP): XLA's cost analysis counts a scan body
once, so common.corrected_flops compiles the layer stacks unrolled at depths 1 and 2 and
extrapolates per layer. Memory: the whole scanned train step (state donated, AdamW moments and EMA
included) from XLA's memory analysis, peak ≈ arguments + outputs + temp − donated aliases, against
the 80 GB (74.5 GiB) of one H100.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import corrected_flops, memory, write  # noqa: E402

from eqx_pi05.config import IMAGE_KEYS, pi05_full, pi05_tiny  # noqa: E402
from eqx_pi05.convert.openpi import abstract_model  # noqa: E402
from eqx_pi05.distill import distill_loss, drop_camera, remove_camera  # noqa: E402
from eqx_pi05.model import Observation, Pi05, sample_noise_and_time  # noqa: E402
from eqx_pi05.train.config import VARIANTS, demo_model  # noqa: E402
from eqx_pi05.train.optimizer import make_optimizer  # noqa: E402
from eqx_pi05.train.sharding import global_batch, make_mesh  # noqa: E402
from eqx_pi05.train.state import init_state  # noqa: E402
from eqx_pi05.train.step import StepConfig, abstract, make_train_step, train_step  # noqa: E402

H100_GIB = 80e9 / 2**30
# (variant, p, drop_student): what the step computes for that variant.
CASES = {"pi05_libero": ("pi05_libero", 0.0, False), "curric_selfdistill (p<1)": ("curric_selfdistill", 0.5, False),
         "selfdistill_only (p=1)": ("selfdistill_only", 1.0, True)}
TWO_CAMS = IMAGE_KEYS[:2]  # the padding slot is always compacted away


def batch_arrays(config, b: int, cams, abstract_only: bool = False):
    """The step's batch in the pipeline's layout (uint8 images), concrete or as ShapeDtypeStructs."""
    s, n, h = config.siglip.image_size, config.max_token_len, config.action_horizon
    spec = dict(image={k: ((b, s, s, 3), np.uint8) for k in cams}, image_mask={k: ((b,), bool) for k in cams},
                state=((b, 32), np.float32), tokenized_prompt=((b, n), np.int32), tokenized_prompt_mask=((b, n), bool),
                actions=((b, h, 32), np.float32))
    is_spec = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)  # noqa: E731
    if abstract_only:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(*x), spec, is_leaf=is_spec)
    rng = np.random.default_rng(0)

    def make(x):
        shape, dtype = x
        if dtype == np.uint8:
            return rng.integers(0, 256, shape, dtype=np.uint8)
        if dtype == bool:
            return np.ones(shape, bool) if len(shape) == 1 else np.arange(shape[1])[None].repeat(shape[0], 0) < 20
        return rng.integers(1, 100, shape).astype(dtype) if dtype == np.int32 else rng.normal(size=shape).astype(dtype)

    return jax.tree.map(make, spec, is_leaf=is_spec)


def tiny_rows(runs: int) -> list[dict]:
    rows, mesh = [], make_mesh(1)
    for size, model_cfg in (("demo", demo_model(pi05_tiny())), ("pi05_tiny", pi05_tiny())):
        for name, (variant, p, drop) in CASES.items():
            cfg = VARIANTS[variant]
            optimizer = make_optimizer(cfg.lr, cfg.optimizer)
            state = jax.jit(lambda: init_state(Pi05(model_cfg, key=jax.random.key(0)), optimizer, ema=True, seed=0))()
            state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
            batch = global_batch(batch_arrays(model_cfg, 8, TWO_CAMS), mesh)
            step = make_train_step(StepConfig.of(dataclasses.replace(cfg, ema_decay=0.999)), mesh, abstract(state), 0)
            t0 = time.perf_counter()
            state, m = step(state, batch, np.float32(p), None, drop)
            jax.block_until_ready(m)
            compile_s = time.perf_counter() - t0
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                state, m = step(state, batch, np.float32(p), None, drop)
                jax.block_until_ready(m)
                times.append(time.perf_counter() - t0)
            ms = float(np.median(times)) * 1e3
            rows.append(dict(model=size, case=name, batch=8, step_ms=ms, steps_per_s=1e3 / ms, samples_per_s=8e3 / ms,
                             first_call_s=compile_s))
            print(f"  {size:9s} {name:26s} b=8  {ms:8.1f} ms/step  {1e3 / ms:6.2f} steps/s  (first call {compile_s:.0f} s)", flush=True)
    return rows


def loss_grad_fn(variant: str, p: float, drop: bool):
    """fn(model, batch) -> (loss, grads): the step's loss and gradient (augmentation included)."""
    d = VARIANTS[variant].distill
    lam, anchor = (0.0, 0.0) if d is None else (d.lam, d.anchor_frac)

    def fn(model, batch):
        obs = Observation.from_batch(batch)
        actions = batch["actions"]
        noise, t = sample_noise_and_time(jax.random.key(0), actions.shape)
        student = obs if d is None else drop_camera(obs, d.slot) if drop else remove_camera(obs, d.slot, jnp.float32(p), jax.random.key(1))
        return jax.value_and_grad(lambda m: distill_loss(m, obs, student, actions, noise, t, lam=lam, anchor_frac=anchor)[0])(model)

    return fn


def full_rows(b: int) -> list[dict]:
    rows = []
    base = pi05_full(action_horizon=10)
    # FLOPs: the reference's program (three slots computed, masks decide) and ours, per variant.
    flop_cases = [("reference: BC, 3 slots masked", "pi05_libero", 0.0, False, IMAGE_KEYS)] + [
        (name, v, p, drop, TWO_CAMS) for name, (v, p, drop) in CASES.items()]
    for remat in (True, False):
        config = dataclasses.replace(base, remat=remat)
        for name, variant, p, drop, slots in flop_cases:
            if not remat and name.startswith("reference"):
                continue
            t0 = time.perf_counter()
            flops = corrected_flops(loss_grad_fn(variant, p, drop), config, batch_arrays(config, b, slots, abstract_only=True))
            rows.append(dict(kind="flops", case=name, remat=remat, batch=b, tflops=flops["flops"] / 1e12,
                             per_llm_layer_tflops=flops["per_llm_layer"] / 1e12, per_siglip_layer_tflops=flops["per_siglip_layer"] / 1e12))
            print(f"  loss+grad b={b} remat={remat!s:5s} {name:32s} {rows[-1]['tflops']:7.1f} TFLOP  ({time.perf_counter() - t0:.0f} s)", flush=True)
    # Memory: the whole train step at full depth (scanned), state donated; and pi05_libero without EMA.
    memory_cases = [(remat, name, case, True) for remat in (True, False) for name, case in CASES.items()]
    for remat, name, (variant, p, drop), ema in memory_cases + [(True, "pi05_libero, no EMA", CASES["pi05_libero"], False)]:
        config = dataclasses.replace(base, remat=remat)
        cfg = dataclasses.replace(VARIANTS[variant], model=config, ema_decay=0.999 if ema else None)
        optimizer = make_optimizer(cfg.lr, cfg.optimizer)
        state = jax.eval_shape(lambda m: init_state(m, optimizer, ema=ema, seed=0), abstract_model(config))
        t0 = time.perf_counter()
        step = jax.jit(lambda s, bt, p_: train_step(s, bt, p_, None, drop, cfg=StepConfig.of(cfg)), donate_argnums=0)
        compiled = step.lower(state, batch_arrays(config, b, TWO_CAMS, abstract_only=True), jax.ShapeDtypeStruct((), jnp.float32)).compile()
        mem = memory(compiled)
        rows.append(dict(kind="memory", case=name, remat=remat, ema=ema, batch=b, **mem, fits_h100=mem["peak_gib"] <= H100_GIB))
        print(f"  train step b={b} remat={remat!s:5s} {name:26s} args {mem['argument_gib']:5.1f} GiB  temp {mem['temp_gib']:6.1f} GiB  "
              f"peak {mem['peak_gib']:6.1f} GiB vs H100 {H100_GIB:.1f} GiB: {'fits' if mem['peak_gib'] <= H100_GIB else 'does NOT fit'}"
              f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--skip-full", action="store_true")
    p.add_argument("--skip-tiny", action="store_true")
    args = p.parse_args()
    tiny = []
    if not args.skip_tiny:
        print(f"(a) tiny sizes on {jax.devices()[0].device_kind}, whole train step, median of {args.runs}")
        tiny = tiny_rows(args.runs)
    full = []
    if not args.skip_full:
        print(f"(b) full size (bf16, prompt 200, horizon 10), batch {args.batch}, lowered abstractly. FLOPs are loop-corrected:\n"
              "    XLA counts a scan body once, so the stacks are compiled unrolled at depths 1 and 2 and extrapolated per layer.")
        full = full_rows(args.batch)
    print("wrote", write("train_step", dict(tiny=tiny, full=full, reference_tflops_loss_grad={"b1": 17.35, "b32": 554.5},
                                             h100_gib=H100_GIB)))


if __name__ == "__main__":
    main()
