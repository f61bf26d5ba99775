"""Gemma blocks for two experts sharing one attention (openpi's `gemma.Module` with configs=[LLM, expert]).

Each expert projects its own tokens with its own weights; q/k/v of both experts are concatenated along
the sequence (expert 0 first), attention runs once, and the output is split back and projected by each
expert's own output weights. Norms and MLPs are per expert. The action expert uses adaRMSNorm with gated
residuals, conditioned on the flow-matching time. Layers are stacked on a leading depth axis and run
with `jax.lax.scan`; the per-layer keys/values come back stacked as the KV cache (depth, b, s, k, h).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from eqx_pi05.config import GemmaConfig
from eqx_pi05.nn.attention import attention
from eqx_pi05.nn.linear import Dense
from eqx_pi05.nn.lora import Einsum
from eqx_pi05.nn.stacked import fold, stack

KVCache = tuple[Float[Array, "l b c k hd"], Float[Array, "l b c k hd"]]


def _rms(x: Float[Array, "*b d"]) -> Float[Array, "*b d"]:
    """x / sqrt(mean(x²) + 1e-6) with the statistic in float32; the result is float32."""
    var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    return x * jnp.reciprocal(jnp.sqrt(var + 1e-6))


class RMSNorm(eqx.Module):
    scale: Float[Array, " d"]

    def __init__(self, width: int):
        self.scale = jnp.zeros((width,), jnp.float32)

    def __call__(self, x: Float[Array, "b t d"], cond: None = None) -> tuple[Float[Array, "b t d"], None]:
        return (_rms(x) * (1 + self.scale)).astype(x.dtype), None


class AdaRMSNorm(eqx.Module):
    """norm(x)·(1+scale)+shift with (scale, shift, gate) = Dense(cond); zero-initialised modulation."""

    modulation: Dense

    def __init__(self, width: int, cond_width: int, *, key: PRNGKeyArray):
        self.modulation = Dense(cond_width, 3 * width, key=key, zero_init=True)

    def __call__(
        self, x: Float[Array, "b t d"], cond: Float[Array, "b c"]
    ) -> tuple[Float[Array, "b t d"], Float[Array, "b 1 d"]]:
        mod = self.modulation(cond, dtype=x.dtype)[:, None, :]
        scale, shift, gate = jnp.split(mod, 3, axis=-1)
        return (_rms(x) * (1 + scale) + shift).astype(x.dtype), gate


class Attention(eqx.Module):
    """One expert's projections: q (N, D, H), kv (2, K, D, H), out (N, H, D)."""

    q_einsum: Einsum
    kv_einsum: Einsum
    attn_vec_einsum: Einsum

    def __init__(self, cfg: GemmaConfig, *, key: PRNGKeyArray):
        kq, kkv, ko = jax.random.split(key, 3)
        n, k, d, h = cfg.num_heads, cfg.num_kv_heads, cfg.width, cfg.head_dim
        self.q_einsum = Einsum((n, d, h), -2, -1, key=kq, lora=cfg.lora)
        self.kv_einsum = Einsum((2, k, d, h), -2, -1, key=kkv, lora=cfg.lora)
        self.attn_vec_einsum = Einsum((n, h, d), (-3, -2), -1, key=ko, lora=cfg.lora)


class FeedForward(eqx.Module):
    """Gated GELU (tanh): (gelu(x·W_gate) ⊙ x·W_up)·W_down with gating (2, D, F) and linear (F, D)."""

    gating_einsum: Einsum
    linear: Einsum

    def __init__(self, cfg: GemmaConfig, *, key: PRNGKeyArray):
        kg, kl = jax.random.split(key)
        d, f = cfg.width, cfg.mlp_dim
        self.gating_einsum = Einsum((2, d, f), -2, -1, key=kg, lora=cfg.lora, lora_scaled=False)
        self.linear = Einsum((f, d), -2, -1, key=kl, lora=cfg.lora, lora_scaled=False)

    def __call__(self, x: Float[Array, "b t d"]) -> Float[Array, "b t d"]:
        gate, up = self.gating_einsum("btd,cdf->cbtf", x)
        return self.linear("btf,fd->btd", jax.nn.gelu(gate, approximate=True) * up)


class ExpertLayer(eqx.Module):
    pre_attention_norm: RMSNorm | AdaRMSNorm
    attn: Attention
    pre_ffw_norm: RMSNorm | AdaRMSNorm
    mlp: FeedForward

    def __init__(self, cfg: GemmaConfig, adaptive: bool, *, key: PRNGKeyArray):
        k1, k2, ka, km = jax.random.split(key, 4)
        norm = (lambda k: AdaRMSNorm(cfg.width, cfg.width, key=k)) if adaptive else (lambda k: RMSNorm(cfg.width))
        self.pre_attention_norm = norm(k1)
        self.attn = Attention(cfg, key=ka)
        self.pre_ffw_norm = norm(k2)
        self.mlp = FeedForward(cfg, key=km)


def apply_rope(x: Float[Array, "b t n h"], positions: Int[Array, "b t"], max_wavelength: float = 10_000.0):
    """Rotate-half RoPE: angle = pos / wavelength^(2j/h); [x1·cos − x2·sin | x2·cos + x1·sin], in float32."""
    half = x.shape[-1] // 2
    timescale = max_wavelength ** ((2.0 / x.shape[-1]) * jnp.arange(half, dtype=jnp.float32))
    radians = (positions[..., None] / timescale)[..., None, :]
    sin, cos = jnp.sin(radians), jnp.cos(radians)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def joint_attention(
    attns: tuple[Attention, Attention],
    xs: tuple[Float[Array, "b _t0 _d0"] | None, Float[Array, "b _t1 _d1"] | None],
    positions: Int[Array, "b t"],
    mask: Bool[Array, "b t s"],
    kv_cache: tuple[Float[Array, "b _c k hd"], Float[Array, "b _c k hd"]] | None,
):
    """One softmax over [cache | expert-0 tokens | expert-1 tokens]; returns per-expert outputs and (k, v)."""
    qs, ks, vs = [], [], []
    for attn, x in zip(attns, xs):
        if x is None:
            continue
        qs.append(attn.q_einsum("btd,ndh->btnh", x))
        k, v = attn.kv_einsum("bsd,ckdh->cbskh", x)
        ks.append(k)
        vs.append(v)
    q, k, v = (jnp.concatenate(y, axis=1) for y in (qs, ks, vs))
    q = apply_rope(q, positions) * q.shape[-1] ** -0.5
    k = apply_rope(k, positions)
    if kv_cache is not None:
        k = jnp.concatenate([kv_cache[0], k], axis=1)
        v = jnp.concatenate([kv_cache[1], v], axis=1)
    enc = attention(q, k, v, mask, logits_dtype=jnp.float32)
    outs, start = [], 0
    for attn, x in zip(attns, xs):
        if x is None:
            outs.append(None)
            continue
        end = start + x.shape[1]
        outs.append(attn.attn_vec_einsum("btnh,nhd->btd", enc[:, start:end]))
        start = end
    return tuple(outs), (k, v)


def _residual(x, y, gate):
    return x + y if gate is None else x + y * gate


def joint_block(layers: tuple[ExpertLayer, ExpertLayer], xs, positions, mask, conds, kv_cache):
    normed, gates = [], []
    for layer, x, c in zip(layers, xs, conds):
        h, g = (None, None) if x is None else layer.pre_attention_norm(x, c)
        normed.append(h)
        gates.append(g)
    attn_out, kv = joint_attention(tuple(l.attn for l in layers), tuple(normed), positions, mask, kv_cache)
    xs = [None if x is None else _residual(x, y, g) for x, y, g in zip(xs, attn_out, gates)]
    out = []
    for layer, x, c in zip(layers, xs, conds):
        if x is None:
            out.append(None)
            continue
        h, g = layer.pre_ffw_norm(x, c)
        out.append(_residual(x, layer.mlp(h), g))
    return tuple(out), kv


class Embedder(eqx.Module):
    input_embedding: Float[Array, "v d"]

    def __init__(self, vocab: int, width: int, *, key: PRNGKeyArray):
        self.input_embedding = jax.random.normal(key, (vocab, width), jnp.float32)

    def __call__(self, tokens: Int[Array, "b t"], dtype) -> Float[Array, "b t d"]:
        x = self.input_embedding[tokens]
        return (x * jnp.sqrt(x.shape[-1]).astype(x.dtype)).astype(dtype)


class JointTransformer(eqx.Module):
    """PaliGemma LLM (expert 0) + action expert (expert 1), `depth` stacked joint blocks."""

    embedder: Embedder
    layers: tuple[ExpertLayer, ExpertLayer]  # each leaf stacked on a leading depth axis
    final_norm: RMSNorm
    final_norm_1: AdaRMSNorm
    remat: bool = eqx.field(static=True)
    unroll: bool = eqx.field(static=True)

    def __init__(
        self,
        llm: GemmaConfig,
        expert: GemmaConfig,
        vocab: int,
        *,
        key: PRNGKeyArray,
        remat: bool = False,
        unroll: bool = False,
    ):
        ke, k0, k1, kf = jax.random.split(key, 4)
        self.embedder = Embedder(vocab, llm.width, key=ke)
        self.layers = (
            stack(lambda k: ExpertLayer(llm, False, key=k), k0, llm.depth),
            stack(lambda k: ExpertLayer(expert, True, key=k), k1, expert.depth),
        )
        self.final_norm = RMSNorm(llm.width)
        self.final_norm_1 = AdaRMSNorm(expert.width, expert.width, key=kf)
        self.remat = remat
        self.unroll = unroll

    def __call__(
        self,
        xs: tuple[Float[Array, "b _t0 _d0"] | None, Float[Array, "b _t1 _d1"] | None],
        positions: Int[Array, "b t"],
        mask: Bool[Array, "b t s"],
        adarms_cond: Float[Array, "b _c"] | None = None,
        kv_cache: KVCache | None = None,
    ):
        """Returns (per-expert outputs after the final norms, stacked (k, v) of every layer)."""
        conds = (None, adarms_cond)
        if xs[1] is not None and adarms_cond is None:
            raise ValueError("the action expert needs adarms_cond (the time condition)")
        body = lambda layers, carry, cache: joint_block(layers, carry, positions, mask, conds, cache)  # noqa: E731
        out, kv = fold(body, self.layers, tuple(xs), kv_cache, remat=self.remat, unroll=self.unroll)
        final = (
            None if out[0] is None else self.final_norm(out[0])[0],
            None if out[1] is None else self.final_norm_1(out[1], adarms_cond)[0],
        )
        return final, kv
