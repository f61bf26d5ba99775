"""Train step: (a) wall time of the real jitted step on this CPU at the tiny size, masked vs
compacted; (b) the full-size step lowered with abstract shapes (nothing allocated) at batch 32, in
the formulation train.py runs, with the prompt untrimmed (200) and trimmed (32): XLA FLOPs per
sample against openpi's 17.35, and the whole step's peak memory; then memory-only rows (the EMA in
host memory, no EMA, openpi's batch 256 by gradient accumulation, Adam's first moment in bfloat16).

    python benchmarks/train_step.py [--runs 5] [--batch 32] [--prompt-lens 32 200] [--skip-full] [--skip-tiny] [--model tiny|demo]

A skipped part (or prompt width) keeps its rows from the last results file of this backend.

(a) measures each variant in two or three formulations of the same function:
- masked: the reference's program — all three camera slots go through the image tower and every
  layer, the masks decide (the padding slot; the removed camera; the student's camera per row);
- compacted: what `train.py` runs — slots masked in every row are left out of the batch (the
  padding slot always, the agentview under view_remove p = 1), a p = 1 student is wrist-only;
- for mixed batches (curriculum, p < 1) two ways to keep the per-row choice: the student masked per
  row (2 slots), or its rows grouped by camera set (the compacted wrist-only forward selected per row
  against the live both-camera forward the loss computes anyway; the default, `StepConfig.group_student`).
Median ms of the whole step (augmentation, loss, grad, clip + AdamW, EMA) at batch 8, and the first
step's loss of every formulation against the masked one (the same function: ≤ 1e-5 relative).

(b) FLOPs of loss + grad (the optimizer adds ~0.1 TFLOP to all alike): XLA's cost analysis counts a
scan body once, so `common.corrected_flops` compiles the layer stacks unrolled at depths 1 and 2 and
extrapolates per layer. Memory: the whole scanned train step (remat, state donated, AdamW moments and
EMA float32), peak = arguments + outputs + temp − donated aliases, against one 80 GB GPU (74.5 GiB).
Every row carries case, cameras ("both"/"wrist"), ema, prompt_len, batch, tflops_per_sample (a
memory-only row: its case's, as loss + grad do not depend on the option) and peak_gib.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from batches import abstract_batch, random_batch  # noqa: E402
from common import corrected_flops, memory, read, write  # noqa: E402

from eqx_pi05.cameras import SLOTS  # noqa: E402
from eqx_pi05.config import pi05_full, pi05_tiny  # noqa: E402
from eqx_pi05.convert.openpi import abstract_model  # noqa: E402
from eqx_pi05.model import Pi05  # noqa: E402
from eqx_pi05.variants import VARIANTS, demo_model  # noqa: E402
from eqx_pi05.train.optimizer import make_optimizer  # noqa: E402
from eqx_pi05.train.sharding import global_batch, make_mesh  # noqa: E402
from eqx_pi05.train.state import TrainState, init_state, split_model  # noqa: E402
from eqx_pi05.train.step import StepConfig, _ema_leaf, jit_train_step, loss_and_grads, train_step  # noqa: E402

H100_GIB = 80e9 / 2**30
OPENPI_TFLOPS_PER_SAMPLE = 17.35  # openpi pi05_libero loss + grad, measured the same way (issue 14)
PROMPT_LEN = 20  # (a)'s valid prompt tokens (LIBERO's prompts are 15-21 tokens)
AGENT, WRIST, PAD = SLOTS


class Form(NamedTuple):
    """One formulation: the batch's slots, which of them are masked in every row, and the step's switches."""

    slots: tuple[str, ...]
    masked: tuple[str, ...] = ()
    drop_student: bool = False
    group_student: bool = False


MASKED = Form(SLOTS, (PAD,))
# case -> (variant, p, {formulation: Form}); the first formulation is the reference the others are compared with.
CASES = {
    "both-cam BC (pi05_libero)": ("pi05_libero", 0.0, {"masked": MASKED, "compacted": Form(SLOTS[:2])}),
    "wrist-only BC (wristonly_physdrop)": ("wristonly_physdrop", 0.0,
                                           {"masked": Form(SLOTS, (AGENT, PAD)), "compacted": Form((WRIST,))}),
    "selfdistill_only (p=1)": ("selfdistill_only", 1.0,
                               {"masked": MASKED, "compacted": Form(SLOTS[:2], drop_student=True)}),
    "curric_selfdistill (p=0.5)": ("curric_selfdistill", 0.5, {
        "masked": MASKED,
        "compacted, student masked per row": Form(SLOTS[:2]),
        "compacted, grouped by camera set": Form(SLOTS[:2], group_student=True),
    }),
}


def step_config(variant: str, form: Form, ema: bool = True) -> StepConfig:
    cfg = dataclasses.replace(VARIANTS[variant], ema_decay=0.999 if ema else None)
    return dataclasses.replace(StepConfig.of(cfg), group_student=form.group_student)


def tiny_rows(runs: int, model: str) -> list[dict]:
    rows, mesh = [], make_mesh(1)
    model_cfg = pi05_tiny() if model == "tiny" else demo_model(pi05_tiny())
    for case, (variant, p, forms) in CASES.items():
        ref_loss, ref_ms = None, None
        for name, form in forms.items():
            cfg = VARIANTS[variant]
            state = jax.jit(lambda: init_state(Pi05(model_cfg, key=jax.random.key(0)), make_optimizer(cfg.lr, cfg.optimizer),
                                               ema=True, seed=0))()
            state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
            # one seed: every formulation sees the same values (only the slot set and masks differ)
            masks = {k: k not in form.masked for k in form.slots}
            batch = global_batch(random_batch(model_cfg, 8, masks=masks, slots=form.slots, prompt_len=PROMPT_LEN), mesh)
            step = functools.partial(jit_train_step, cfg=step_config(variant, form), mesh=mesh, min_bytes=0)
            t0 = time.perf_counter()
            state, m = step(state, batch, np.float32(p), None, form.drop_student)
            loss = float(m["loss"])
            compile_s = time.perf_counter() - t0
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                state, m = step(state, batch, np.float32(p), None, form.drop_student)
                jax.block_until_ready(m)
                times.append(time.perf_counter() - t0)
            ms = float(np.median(times)) * 1e3
            if ref_loss is None:
                ref_loss, ref_ms = loss, ms
            rel = abs(loss - ref_loss) / abs(ref_loss)
            rows.append(dict(model=model, case=case, formulation=name, batch=8, step_ms=ms, vs_masked=ms / ref_ms,
                             first_loss=loss, loss_rel_diff=rel, first_call_s=compile_s))
            print(f"  {case:34s} {name:34s} {ms:8.1f} ms/step  {ms / ref_ms:5.2f}× masked  loss rel diff {rel:.1e}"
                  f"  (first call {compile_s:.0f} s)", flush=True)
            if rel > 1e-5:
                raise AssertionError(f"{case}: {name} is not the masked function (first-step loss rel diff {rel:.2e})")
    return rows


def loss_grad_fn(variant: str, p: float, form: Form):
    """fn(model, batch) -> the step's (loss, terms, grads) (`train.step.loss_and_grads`, augmentation included)."""
    cfg = step_config(variant, form)

    def fn(model, batch):
        params, frozen = split_model(model)
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen, opt_state=None, ema=None,
                           rng=jax.random.key_data(jax.random.key(0)))
        return loss_and_grads(state, batch, jnp.float32(p), None, form.drop_student, cfg)

    return fn


def step_memory(config, variant: str, form: Form, b: int, ema: bool, grad_accum_steps: int = 1, mu_dtype: str | None = None,
                ema_memory: str = "device") -> dict:
    """Memory analysis of the whole scanned train step (state donated) at full size, abstractly. With
    the EMA in host memory (`--ema-memory host`) the step runs without it and the EMA update after it
    (`ema_host_phase`); the peak is the larger of the two phases' device memory."""
    base = VARIANTS[variant]
    cfg = dataclasses.replace(base, model=config, data=dataclasses.replace(base.data, max_token_len=config.max_token_len),
                              ema_decay=0.999 if ema else None, optimizer=dataclasses.replace(base.optimizer, mu_dtype=mu_dtype))
    optimizer = make_optimizer(cfg.lr, cfg.optimizer)
    state = jax.eval_shape(lambda m: init_state(m, optimizer, ema=ema, seed=0), abstract_model(config))
    in_step = ema and ema_memory == "device"
    step_cfg = dataclasses.replace(step_config(variant, form, in_step), optimizer=cfg.optimizer, grad_accum_steps=grad_accum_steps)
    step = jax.jit(lambda s, bt, p_: train_step(s, bt, p_, None, form.drop_student, cfg=step_cfg), donate_argnums=0)
    step_state = state if in_step else dataclasses.replace(state, ema=None)
    mem = memory(step.lower(step_state, abstract_batch(config, b, form.slots), jax.ShapeDtypeStruct((), jnp.float32)).compile())
    if ema and ema_memory == "host":
        mem = dict(**mem, step_peak_gib=mem["peak_gib"], **ema_host_phase(state))
        mem["peak_gib"] = max(mem["step_peak_gib"], mem["ema_update_peak_gib"])
    return dict(**mem, fits_h100=mem["peak_gib"] <= H100_GIB)


def ema_host_phase(state: TrainState) -> dict:
    """Device memory of the EMA update after a step when the EMA lives in pinned host memory: the
    state but the EMA stays resident, plus one leaf's update program at a time (the largest leaf's
    compiled abstractly; the CPU backend counts that program's host-memory argument and output as
    device memory, so on a CPU this is an upper bound). host_gib: the EMA, held in host memory."""
    gib = lambda leaves: sum(x.size * x.dtype.itemsize for x in leaves) / 2**30  # noqa: E731
    ema = jax.tree.leaves(state.ema)
    largest = max(ema, key=lambda x: x.size)
    on_host = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
    leaf = _ema_leaf.lower(jax.ShapeDtypeStruct(largest.shape, largest.dtype, sharding=on_host),
                           jax.ShapeDtypeStruct(largest.shape, largest.dtype), decay=0.999).compile()
    resident = gib(jax.tree.leaves(dataclasses.replace(state, ema=None)))
    return dict(ema_update_peak_gib=resident + memory(leaf)["peak_gib"], host_gib=gib(ema))


def _cameras(form: Form) -> str:
    return "wrist" if form.slots == (WRIST,) else "both"


# What train.py runs per case (the reference's masked program costs openpi's 17.35 TFLOP per sample).
TRAINED = {"both-cam BC (pi05_libero)": "compacted", "wrist-only BC (wristonly_physdrop)": "compacted",
           "selfdistill_only (p=1)": "compacted", "curric_selfdistill (p=0.5)": "compacted, grouped by camera set"}
# Memory-only rows: (case, what, batch, ema, grad_accum_steps, mu_dtype, ema_memory).
HOST = "EMA in host memory (--ema-memory host)"
MU_BF16 = "Adam mu in bfloat16 (--optimizer.mu-dtype bfloat16)"
MEMORY_ROWS = [
    ("both-cam BC (pi05_libero)", HOST, 32, True, 1, None, "host"),
    ("wrist-only BC (wristonly_physdrop)", HOST, 32, True, 1, None, "host"),
    ("curric_selfdistill (p=0.5)", HOST, 32, True, 1, None, "host"),
    ("curric_selfdistill (p=0.5)", f"{HOST}, {MU_BF16}", 32, True, 1, "bfloat16", "host"),
    ("both-cam BC (pi05_libero)", "no EMA", 32, False, 1, None, "device"),
    ("both-cam BC (pi05_libero)", "openpi's batch 256 as 8 x 32 (--grad-accum-steps 8)", 256, True, 8, None, "device"),
    ("both-cam BC (pi05_libero)", f"openpi's batch 256 as 8 x 32, {HOST}", 256, True, 8, None, "host"),
    ("curric_selfdistill (p=0.5)", MU_BF16, 32, True, 1, "bfloat16", "device"),
    ("wrist-only BC (wristonly_physdrop)", MU_BF16, 32, True, 1, "bfloat16", "device"),
    ("both-cam BC (pi05_libero)", MU_BF16, 32, True, 1, "bfloat16", "device"),
]


def full_rows(b: int, prompt_len: int) -> list[dict]:
    """The trained formulation of every case at batch `b`, the prompt `prompt_len` wide (200: untrimmed;
    32: trimmed, the bucket of LIBERO's 15-21-token prompts): FLOPs of loss + grad per sample and
    the whole step's peak memory with EMA; then the memory-only rows (at this prompt width)."""
    rows = []
    config = pi05_full(action_horizon=10, max_token_len=prompt_len)  # remat on, as trained
    for case, formulation in TRAINED.items():
        variant, p, forms = CASES[case]
        form = forms[formulation]
        t0 = time.perf_counter()
        flops = corrected_flops(loss_grad_fn(variant, p, form), config, abstract_batch(config, b, form.slots))
        tflops = flops["flops"] / 1e12
        mem = step_memory(config, variant, form, b, ema=True)
        rows.append(dict(case=case, formulation=formulation, cameras=_cameras(form), ema=True, prompt_len=prompt_len, batch=b,
                         tflops=tflops, tflops_per_sample=tflops / b, vs_openpi=tflops / b / OPENPI_TFLOPS_PER_SAMPLE,
                         per_llm_layer_tflops=flops["per_llm_layer"] / 1e12, per_siglip_layer_tflops=flops["per_siglip_layer"] / 1e12, **mem))
        print(f"  {case:34s} prompt {prompt_len:3d}  {tflops / b:6.2f} TFLOP/sample ({tflops / b / OPENPI_TFLOPS_PER_SAMPLE:.3f}x openpi)"
              f"  temp {mem['temp_gib']:5.1f} GiB  peak {mem['peak_gib']:5.1f} GiB ({'fits' if mem['fits_h100'] else 'over'} 80 GB)"
              f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    for case, what, batch, ema, k, mu_dtype, ema_memory in MEMORY_ROWS:
        variant, _, forms = CASES[case]
        form = forms[TRAINED[case]]
        mem = step_memory(config, variant, form, batch, ema=ema, grad_accum_steps=k, mu_dtype=mu_dtype, ema_memory=ema_memory)
        # loss + grad do not depend on these options (nor, per sample, on accumulation): the case's FLOPs
        per_sample = next(r["tflops_per_sample"] for r in rows if r["case"] == case)
        rows.append(dict(case=case, formulation=f"{TRAINED[case]}, {what}", cameras=_cameras(form), ema=ema, prompt_len=prompt_len,
                         batch=batch, grad_accum_steps=k, mu_dtype=mu_dtype, ema_memory=ema_memory,
                         tflops_per_sample=per_sample, **mem))
        print(f"  {case:34s} prompt {prompt_len:3d}  {what:52s} temp {mem['temp_gib']:5.1f} GiB  peak {mem['peak_gib']:5.1f} GiB "
              f"({'fits' if mem['fits_h100'] else 'over'} 80 GB)", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-lens", type=int, nargs="+", default=[32, 200], help="(b): prompt widths (32: trimmed, 200: untrimmed)")
    ap.add_argument("--model", choices=("tiny", "demo"), default="tiny", help="(a): pi05_tiny (fixture size) or the demo model")
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--skip-tiny", action="store_true")
    args = ap.parse_args()
    last = read("train_step")  # a skipped part (or prompt width) keeps the rows of the last run
    tiny, full = last.get("tiny", []), [r for r in last.get("full", []) if r.get("prompt_len") not in args.prompt_lens]
    if not args.skip_tiny:
        print(f"(a) {args.model} model on {jax.devices()[0].device_kind}, whole train step, batch 8, median of {args.runs}")
        tiny = tiny_rows(args.runs, args.model)
    if not args.skip_full:
        print(f"(b) full size (bf16, horizon 10, remat), batch {args.batch}, lowered abstractly; FLOPs of loss + grad,\n"
              "    loop-corrected (XLA counts a scan body once: stacks compiled unrolled at depths 1 and 2, extrapolated per layer)")
        for n in args.prompt_lens:
            full = [r for r in full if r.get("prompt_len") != n] + full_rows(args.batch, n)
            write("train_step", dict(tiny=tiny, full=full, h100_gib=H100_GIB, openpi_tflops_per_sample=OPENPI_TFLOPS_PER_SAMPLE))
    print("wrote", write("train_step", dict(tiny=tiny, full=full, h100_gib=H100_GIB, openpi_tflops_per_sample=OPENPI_TFLOPS_PER_SAMPLE)))


if __name__ == "__main__":
    main()
