"""Inference: masked vs compacted camera slots, for the both-cam and wrist-only variants.

    python benchmarks/inference.py [--runs 10] [--prompt-lens 32 200] [--skip-full] [--skip-tiny]

(a) wall time of `sample_actions` (10 Euler steps, KV cache) with the tiny config on this machine;
(b) the full-size π0.5 (bf16, horizon 10) lowered with abstract shapes, nothing allocated: XLA FLOPs
(loop-corrected, see common.corrected_flops) and memory analysis, batch 1, the prompt untrimmed (200)
and trimmed to its bucket (32, what the policy runs on LIBERO's prompts: eqx_pi05.prompt).
"masked" is what the reference computes (all three slots through SigLIP and every layer, masks decide);
"compacted" leaves out the slots masked in every row (eqx_pi05.cameras.compact) — the same function.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from batches import abstract_batch, random_batch  # noqa: E402
from common import CAMERA_SETS, compile_abstract, corrected_flops, median_ms, memory, read, write  # noqa: E402

from eqx_pi05.cameras import compact  # noqa: E402
from eqx_pi05.config import pi05_full, pi05_tiny  # noqa: E402
from eqx_pi05.model import Observation, Pi05, sample_actions  # noqa: E402

OPENPI_TFLOPS = 4.75  # openpi's sample_actions at batch 1, prompt 200, measured the same way
PROMPT_LEN = 20  # (a)'s valid prompt tokens (LIBERO's prompts are 15-21 tokens)
MASKS = {
    "both-cam": {"base_0_rgb": True, "left_wrist_0_rgb": True, "right_wrist_0_rgb": False},
    "wrist-only": {"base_0_rgb": False, "left_wrist_0_rgb": True, "right_wrist_0_rgb": False},
}


def tiny_rows(runs: int) -> list[dict]:
    config = pi05_tiny()
    model = eqx.filter_jit(lambda k: Pi05(config, key=k))(jax.random.key(0))
    rows = []
    for batch in (1, 8):
        noise = jnp.asarray(np.random.default_rng(1).normal(size=(batch, config.action_horizon, 32)), jnp.float32)
        for variant, masks in MASKS.items():
            full = random_batch(config, batch, masks=masks, prompt_len=PROMPT_LEN)
            res = {}
            for mode, b in (("masked", full), ("compacted", compact(full))):
                obs = Observation.from_batch(b)
                res[mode] = median_ms(sample_actions, (model, obs, noise), runs)
                res[mode + "_out"] = np.asarray(sample_actions(model, obs, noise))
            rows.append(
                dict(
                    variant=variant, batch=batch, masked_ms=res["masked"], compacted_ms=res["compacted"],
                    speedup=res["masked"] / res["compacted"], max_abs_diff=float(np.max(np.abs(res["masked_out"] - res["compacted_out"]))),
                )
            )
            r = rows[-1]
            print(f"  tiny sample_actions  {variant:10s} b={batch}  masked {r['masked_ms']:8.1f} ms  compacted {r['compacted_ms']:8.1f} ms  "
                  f"×{r['speedup']:.2f}  max|Δ| {r['max_abs_diff']:.1e}")
    return rows


def full_rows(prompt_len: int) -> list[dict]:
    """sample_actions at batch 1 with the prompt `prompt_len` wide: 200 untrimmed (masked and compacted),
    32 trimmed (compacted: what the policy runs on LIBERO's 15-21-token prompts)."""
    config = dataclasses.replace(pi05_full(max_token_len=prompt_len), remat=False)
    noise = jax.ShapeDtypeStruct((1, config.action_horizon, 32), jnp.float32)

    rows = []
    for name, cams in CAMERA_SETS.items():
        if prompt_len != 200 and "masked" in name:
            continue
        obs = jax.eval_shape(Observation.from_batch, abstract_batch(config, 1, cams))  # float images, as the model sees them
        flops = corrected_flops(sample_actions, config, obs, noise)
        mem = memory(compile_abstract(sample_actions, config, obs, noise))
        rows.append(dict(name=name, cameras="wrist" if name.startswith("wrist") else "both", prompt_len=prompt_len, batch=1,
                         slots=list(cams), tflops=flops["flops"] / 1e12, tflops_per_sample=flops["flops"] / 1e12,
                         vs_openpi=flops["flops"] / 1e12 / OPENPI_TFLOPS, **mem))
        print(f"  full sample_actions b=1 prompt {prompt_len:3d} {name:22s} {rows[-1]['tflops']:6.2f} TFLOP ({rows[-1]['vs_openpi']:.3f}x openpi)"
              f"  temp {mem['temp_gib']:.2f} GiB  peak {mem['peak_gib']:.2f} GiB", flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--prompt-lens", type=int, nargs="+", default=[32, 200], help="(b): prompt widths (32: trimmed, 200: untrimmed)")
    p.add_argument("--skip-full", action="store_true")
    p.add_argument("--skip-tiny", action="store_true")
    args = p.parse_args()
    last = read("inference")  # a skipped part (or prompt width) keeps the rows of the last run
    tiny, full = last.get("tiny", []), [r for r in last.get("full", []) if r.get("prompt_len", 200) not in args.prompt_lens]
    if not args.skip_tiny:
        print("(a) tiny config, wall time, median of", args.runs)
        tiny = tiny_rows(args.runs)
    if not args.skip_full:
        print("(b) full size, XLA analysis of the lowered program (no allocation)")
        for n in args.prompt_lens:
            full += full_rows(n)
    print("wrote", write("inference", dict(tiny=tiny, full=full, reference_tflops_sample_actions_b1=OPENPI_TFLOPS)))


if __name__ == "__main__":
    main()
