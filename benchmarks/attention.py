"""The masked attention kernel, side by side in one run.

    python benchmarks/attention.py [--runs 20] [--batches 2 8] [--prompt-len 48]

Implementations: openpi-style einsum with a boolean mask and float32 softmax (what the reference
runs), `jax.nn.dot_product_attention` (XLA; cuDNN where a GPU is present), each on the full
sequence with cameras masked, and the compacted sequence (masked cameras' tokens dropped). One
attention call of π0.5's geometry: 8 query heads, 1 KV head, head_dim 256; sequence = 3 camera slots
× 256 + prompt + 10 action tokens (prefix-LM mask). Median of --runs after warm-up; outputs of every
implementation are compared on the valid query rows in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from eqx_pi05.masks import make_attn_mask, make_positions
from eqx_pi05.nn.attention import attention
from eqx_pi05.nn.gemma import apply_rope

HEADS, KV_HEADS, HEAD_DIM, CAM_TOKENS, ACTIONS = 8, 1, 256, 256, 10


def einsum_attention(q, k, v, mask):
    """openpi's kernel (our `nn.attention`): grouped einsum, f32 logits, where(mask), f32 softmax, cast back."""
    return attention(q, k, v, mask, logits_dtype=jnp.float32)


def xla_attention(q, k, v, mask):
    impl = "cudnn" if jax.default_backend() == "gpu" and q.dtype == jnp.bfloat16 else "xla"
    # the mask already holds the prefix-LM rule; q is pre-scaled, so scale=1
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=1.0, implementation=impl)


def make_inputs(batch: int, prompt_len: int, masked: tuple[int, ...], dtype, seed=0):
    """q/k/v for [cam0 | cam1 | cam2 | prompt | actions] with the listed camera slots masked out,
    and the same tokens with those slots dropped. RoPE from cumsum(valid) − 1 in both."""
    s = 3 * CAM_TOKENS + prompt_len + ACTIONS
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, s, HEADS, HEAD_DIM)).astype(np.float32)
    k = rng.normal(size=(batch, s, KV_HEADS, HEAD_DIM)).astype(np.float32)
    v = rng.normal(size=(batch, s, KV_HEADS, HEAD_DIM)).astype(np.float32)
    valid = np.ones((batch, s), bool)
    for cam in masked:
        valid[:, cam * CAM_TOKENS : (cam + 1) * CAM_TOKENS] = False
    ar = np.zeros(s, bool)
    ar[s - ACTIONS] = True

    def build(keep):
        m = jnp.asarray(valid[:, keep])
        pos = make_positions(m)
        qq = apply_rope(jnp.asarray(q[:, keep]), pos) * HEAD_DIM**-0.5
        kk = apply_rope(jnp.asarray(k[:, keep]), pos)
        return qq.astype(dtype), kk.astype(dtype), jnp.asarray(v[:, keep]).astype(dtype), make_attn_mask(m, jnp.asarray(ar[keep]))

    full = build(np.arange(s))
    kept = np.flatnonzero(valid[0])
    return full, build(kept), kept


def timed(fn, args, runs):
    fn = jax.jit(fn)
    out = fn(*args).block_until_ready()
    for _ in range(2):
        fn(*args).block_until_ready()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3, np.asarray(out.astype(jnp.float32))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--batches", type=int, nargs="+", default=[2, 8])
    p.add_argument("--prompt-len", type=int, default=48)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / f"attention_{jax.default_backend()}.json"))
    args = p.parse_args()

    scenarios = {"all cameras valid": (), "1 camera masked": (0,), "2 cameras masked (LIBERO wrist-only)": (0, 2)}
    rows = []
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, {platform.processor() or platform.machine()}")
    print(f"one attention call: {HEADS} heads / {KV_HEADS} KV head / head_dim {HEAD_DIM}, prompt {args.prompt_len}, median of {args.runs}")
    header = f"{'scenario':38s} {'dtype':8s} {'b':>2s} {'seq':>5s} {'einsum ms':>10s} {'dpa ms':>8s} {'dropped seq':>11s} {'dropped ms':>10s} {'masked/dropped':>14s} {'max|Δ| valid rows':>18s}"
    print(header)
    for dtype_name in args.dtypes:
        dtype = jnp.dtype(dtype_name)
        for batch in args.batches:
            for name, masked in scenarios.items():
                (full, small, kept) = make_inputs(batch, args.prompt_len, masked, dtype)
                t_ein, o_ein = timed(einsum_attention, full, args.runs)
                t_dpa, o_dpa = timed(xla_attention, full, args.runs)
                t_drop, o_drop = timed(einsum_attention, small, args.runs)
                diff = max(np.max(np.abs(o_ein[:, kept] - o_drop)), np.max(np.abs(o_ein[:, kept] - o_dpa[:, kept])))
                row = dict(
                    scenario=name, dtype=dtype_name, batch=batch, seq=int(full[0].shape[1]), einsum_ms=t_ein, dpa_ms=t_dpa,
                    dropped_seq=int(small[0].shape[1]), dropped_ms=t_drop, masked_over_dropped=t_ein / t_drop,
                    theory=(full[0].shape[1] / small[0].shape[1]) ** 2, max_abs_diff_valid_rows=float(diff),
                )
                rows.append(row)
                print(
                    f"{name:38s} {dtype_name:8s} {batch:2d} {row['seq']:5d} {t_ein:10.1f} {t_dpa:8.1f} {row['dropped_seq']:11d} "
                    f"{t_drop:10.1f} {row['masked_over_dropped']:14.2f} {diff:18.2e}"
                )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=str(jax.devices()[0].device_kind), backend=jax.default_backend(), jax=jax.__version__, runs=args.runs, prompt_len=args.prompt_len)
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
