"""Shared by the benchmarks: camera sets, XLA cost analysis with the loop correction, timing (batches: batches.py)."""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import equinox as eqx
import jax
import numpy as np

from eqx_pi05.cameras import SLOTS
from eqx_pi05.config import Pi05Config
from eqx_pi05.convert.openpi import abstract_model

RESULTS = Path(__file__).parent / "results"

# Camera sets: what the reference computes (every slot, masks decide) vs what compaction computes.
CAMERA_SETS = {
    "both-cam masked": SLOTS,
    "both-cam compacted": SLOTS[:2],
    "wrist-only masked": SLOTS,
    "wrist-only compacted": SLOTS[1:2],
}


def compile_abstract(fn: Callable, config: Pi05Config, *args):
    """Compile fn(model, *args) for the abstract model of `config` (nothing allocated)."""
    params, static = eqx.partition(abstract_model(config), lambda x: isinstance(x, jax.ShapeDtypeStruct))
    return jax.jit(lambda p, *a: fn(eqx.combine(p, static), *a)).lower(params, *args).compile()


def corrected_flops(fn: Callable, config: Pi05Config, *args) -> dict:
    """FLOPs of fn at the config's depths. XLA's cost analysis counts a scan/while body once, so the
    layer stacks are compiled unrolled at depths 1 and 2 (LLM, SigLIP separately) and the per-layer
    difference is extrapolated: total = C(1,1) + (L−1)·ΔLLM + (I−1)·ΔSigLIP. The last LLM layer's
    prefix outputs are dead code (only the suffix is read), which C(1,·) already accounts for."""

    def at(d_llm, d_img):
        cfg = dataclasses.replace(
            config,
            paligemma=dataclasses.replace(config.paligemma, depth=d_llm),
            action_expert=dataclasses.replace(config.action_expert, depth=d_llm),
            siglip=dataclasses.replace(config.siglip, depth=d_img),
            unroll=True,
        )
        return compile_abstract(fn, cfg, *args).cost_analysis()["flops"]

    base, llm2, img2 = at(1, 1), at(2, 1), at(1, 2)
    d_llm, d_img = llm2 - base, img2 - base
    total = base + (config.paligemma.depth - 1) * d_llm + (config.siglip.depth - 1) * d_img
    return dict(flops=total, per_llm_layer=d_llm, per_siglip_layer=d_img)


def memory(compiled) -> dict:
    m = compiled.memory_analysis()
    gib = lambda x: x / 2**30
    return dict(
        temp_gib=gib(m.temp_size_in_bytes),
        argument_gib=gib(m.argument_size_in_bytes),
        output_gib=gib(m.output_size_in_bytes),
        peak_gib=gib(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes),
    )


def median_ms(fn: Callable, args: Sequence, runs: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def machine() -> dict:
    d = jax.devices()[0]
    return dict(device=f"{d.device_kind} ({jax.default_backend()}) x{jax.device_count()}", jax=jax.__version__, cpu=platform.machine())


def result_path(name: str) -> Path:
    return RESULTS / f"{name}_{jax.default_backend()}.json"


def read(name: str) -> dict:
    """The last results written under `name` on this backend ({} if none)."""
    path = result_path(name)
    return json.loads(path.read_text()) if path.exists() else {}


def write(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = result_path(name)
    out.write_text(json.dumps(dict(machine=machine(), **payload), indent=1))
    return out
