"""π0.5: SigLIP + PaliGemma LLM + action expert, flow matching, KV-cached sampling.

Conventions follow openpi's `models/pi0.py` (pi05=True): t=1 is noise, t=0 is data (x_t and the
target u_t: `eqx_pi05.loss.flow_matching`); sampling integrates from t=1 to 0 with 10 Euler steps,
the prefix computed once into a KV cache. The model exposes the velocity; every loss is in `loss.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, Real

from eqx_pi05.cameras import SLOTS
from eqx_pi05.config import Pi05Config
from eqx_pi05.masks import make_attn_mask, make_positions
from eqx_pi05.nn.gemma import JointTransformer, KVCache
from eqx_pi05.nn.linear import Dense
from eqx_pi05.nn.siglip import Siglip


class Observation(eqx.Module):
    """Model inputs. `images` holds the camera slots in `cameras.SLOTS` order; a slot may be left out
    entirely ("compacted"): that is the same function as keeping it with its mask False."""

    images: dict[str, Float[Array, "b h w 3"]]
    image_masks: dict[str, Bool[Array, " b"]]
    state: Float[Array, "b s"]
    tokenized_prompt: Int[Array, "b l"]
    tokenized_prompt_mask: Bool[Array, "b l"]

    def replace(self, **fields) -> Observation:
        """This observation with `fields` replaced (the others shared, not copied)."""
        return dataclasses.replace(self, **fields)

    @staticmethod
    def from_batch(batch: Mapping) -> Observation:
        """From the data pipeline's dict (uint8 or float images); uint8 → float32 in [−1, 1] as openpi."""

        def image(x):
            x = jnp.asarray(x)
            return x.astype(jnp.float32) / 255.0 * 2.0 - 1.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)

        names = [k for k in SLOTS if k in batch["image"]]
        unknown = set(batch["image"]) - set(SLOTS)
        if unknown:
            raise ValueError(f"unknown camera slots {sorted(unknown)}; expected a subset of {SLOTS}")
        return Observation(
            images={k: image(batch["image"][k]) for k in names},
            image_masks={k: jnp.asarray(batch["image_mask"][k], bool) for k in names},
            state=jnp.asarray(batch["state"], jnp.float32),
            tokenized_prompt=jnp.asarray(batch["tokenized_prompt"], jnp.int32),
            tokenized_prompt_mask=jnp.asarray(batch["tokenized_prompt_mask"], bool),
        )


def posemb_sincos(t: Real[Array, " b"], dim: int, min_period: float = 4e-3, max_period: float = 4.0):
    """Sin-cos embedding of scalar times; float32 arithmetic in openpi's order (the fixture matches it
    bit for bit; a float64 or reordered version differs by ~1e-4 because the angles reach ~1.5e3)."""
    fraction = jnp.linspace(0.0, 1.0, dim // 2)
    period = min_period * (max_period / min_period) ** fraction
    angle = jnp.einsum("i,j->ij", t, 1.0 / period * 2 * jnp.pi, precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)


class Pi05(eqx.Module):
    img: Siglip
    llm: JointTransformer
    action_in_proj: Dense
    time_mlp_in: Dense
    time_mlp_out: Dense
    action_out_proj: Dense
    config: Pi05Config = eqx.field(static=True)

    def __init__(self, config: Pi05Config, *, key: PRNGKeyArray):
        ki, kl, ka, kt1, kt2, ko = jax.random.split(key, 6)
        w = config.action_expert.width
        flags = dict(remat=config.remat, unroll=config.unroll)
        self.img = Siglip(config.siglip, config.paligemma.width, key=ki, **flags)
        self.llm = JointTransformer(config.paligemma, config.action_expert, config.vocab_size, key=kl, **flags)
        self.action_in_proj = Dense(config.action_dim, w, key=ka)
        self.time_mlp_in = Dense(w, w, key=kt1)
        self.time_mlp_out = Dense(w, w, key=kt2)
        self.action_out_proj = Dense(w, config.action_dim, key=ko)
        self.config = config

    @property
    def dtype(self):
        return jnp.dtype(self.config.dtype)

    def embed_prefix(
        self, obs: Observation
    ) -> tuple[Float[Array, "b s d"], Bool[Array, "b s"], Bool[Array, " s"]]:
        """[256 image tokens per present camera slot | prompt tokens]; ar_mask all False."""
        tokens, masks = [], []
        names = [k for k in SLOTS if k in obs.images]
        if names:
            # One image-tower call for every present camera, stacked along the batch: one layer scan
            # and one set of weight gradients instead of one per camera (each image is its own row).
            b = obs.state.shape[0]
            images = self.img(jnp.concatenate([obs.images[k] for k in names]), dtype=self.dtype)
            for i, name in enumerate(names):
                tokens.append(images[i * b : (i + 1) * b])
                masks.append(jnp.broadcast_to(obs.image_masks[name][:, None], tokens[-1].shape[:2]))
        tokens.append(self.llm.embedder(obs.tokenized_prompt, self.dtype))
        masks.append(obs.tokenized_prompt_mask)
        tokens = jnp.concatenate(tokens, axis=1)
        return tokens, jnp.concatenate(masks, axis=1), jnp.zeros(tokens.shape[1], bool)

    def embed_suffix(
        self, x_t: Float[Array, "b h a"], t: Float[Array, " b"]
    ) -> tuple[Float[Array, "b h w"], Bool[Array, "b h"], Bool[Array, " h"], Float[Array, "b w"]]:
        """Action tokens and the adaRMS condition swish(mlp_out(swish(mlp_in(sincos(t))))).
        The time enters only through adaRMS (π0.5: no state token, no time concat)."""
        tokens = self.action_in_proj(x_t)
        cond = posemb_sincos(t, self.config.action_expert.width)
        cond = jax.nn.swish(self.time_mlp_out(jax.nn.swish(self.time_mlp_in(cond))))
        h = x_t.shape[1]
        ar = jnp.arange(h) == 0
        return tokens, jnp.ones(tokens.shape[:2], bool), ar, cond

    def velocity(
        self, obs: Observation, x_t: Float[Array, "b h a"], t: Float[Array, " b"]
    ) -> Float[Array, "b h a"]:
        """v(obs, x_t, t) from one joint forward over [prefix | suffix]. Pure: call it twice in one step
        with two observations (student wrist-only, teacher both cameras) — one model, no copy."""
        prefix, prefix_mask, prefix_ar = self.embed_prefix(obs)
        suffix, suffix_mask, suffix_ar, cond = self.embed_suffix(x_t, t)
        input_mask = jnp.concatenate([prefix_mask, suffix_mask], axis=1)
        mask = make_attn_mask(input_mask, jnp.concatenate([prefix_ar, suffix_ar]))
        (_, suffix_out), _ = self.llm(
            (prefix.astype(self.dtype), suffix.astype(self.dtype)), make_positions(input_mask), mask, cond
        )
        return self.action_out_proj(suffix_out[:, -x_t.shape[1] :])

    def prefill(self, obs: Observation) -> tuple[KVCache, Bool[Array, "b p"]]:
        """Run the prefix alone (LLM weights only) into a KV cache."""
        prefix, prefix_mask, prefix_ar = self.embed_prefix(obs)
        mask = make_attn_mask(prefix_mask, prefix_ar)
        _, kv = self.llm((prefix.astype(self.dtype), None), make_positions(prefix_mask), mask)
        return kv, prefix_mask

    def cached_velocity(
        self, kv: KVCache, prefix_mask: Bool[Array, "b p"], x_t: Float[Array, "b h a"], t: Float[Array, " b"]
    ) -> Float[Array, "b h a"]:
        """v from the suffix alone, attending to the cached prefix keys/values."""
        suffix, suffix_mask, suffix_ar, cond = self.embed_suffix(x_t, t)
        h = suffix.shape[1]
        prefix_part = jnp.broadcast_to(prefix_mask[:, None, :], (x_t.shape[0], h, prefix_mask.shape[1]))
        mask = jnp.concatenate([prefix_part, make_attn_mask(suffix_mask, suffix_ar)], axis=-1)
        positions = make_positions(suffix_mask, offset=jnp.sum(prefix_mask, axis=-1, dtype=jnp.int32))
        (_, out), _ = self.llm((None, suffix.astype(self.dtype)), positions, mask, cond, kv_cache=kv)
        return self.action_out_proj(out[:, -h:])


def sample_noise_and_time(
    key: PRNGKeyArray, shape: tuple[int, int, int]
) -> tuple[Float[Array, "b h a"], Float[Array, " b"]]:
    """noise ~ N(0, I); t ~ Beta(1.5, 1)·0.999 + 0.001 (biased towards t = 1, pure noise), as openpi."""
    k_noise, k_time = jax.random.split(key)
    noise = jax.random.normal(k_noise, shape)
    t = jax.random.beta(k_time, 1.5, 1.0, shape[:1]) * 0.999 + 0.001
    return noise, t


@eqx.filter_jit
def sample_actions(
    model: Pi05, obs: Observation, noise: Float[Array, "b h a"], num_steps: int = 10
) -> Float[Array, "b h a"]:
    """Euler from t=1 (noise) to t=0 with dt = −1/num_steps; the prefix runs once into a KV cache."""
    kv, prefix_mask = model.prefill(obs)
    dt = -1.0 / num_steps
    b = noise.shape[0]

    def step(_, carry):
        x, t = carry
        v = model.cached_velocity(kv, prefix_mask, x, jnp.broadcast_to(t, (b,)))
        return x + dt * v, t + dt

    x0, _ = jax.lax.fori_loop(0, num_steps, step, (noise, jnp.float32(1.0)))
    return x0


def count_params(model) -> int:
    """Number of parameters; works on abstract (eval_shape) models too."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(model) if hasattr(x, "shape")))
