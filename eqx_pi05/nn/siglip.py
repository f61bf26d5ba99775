"""SigLIP image tower (ViT, pre-LN, learned position embedding, no pooling) + linear head to the LLM width.

Param layout follows big_vision / openpi (`PaliGemma/img/...`): blocks stacked on a leading depth axis
and run with `jax.lax.scan`. Patch embedding and position embedding run in float32, the encoder in the
compute dtype, LayerNorm statistics in float32 (flax's "fast variance": E[x²] − E[x]²).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from eqx_pi05.config import SiglipConfig
from eqx_pi05.nn.attention import attention
from eqx_pi05.nn.linear import Dense
from eqx_pi05.nn.stacked import fold, stack


class LayerNorm(eqx.Module):
    scale: Float[Array, " d"]
    bias: Float[Array, " d"]

    def __init__(self, width: int):
        self.scale = jnp.ones((width,), jnp.float32)
        self.bias = jnp.zeros((width,), jnp.float32)

    def __call__(self, x: Float[Array, "*b d"]) -> Float[Array, "*b d"]:
        dtype = x.dtype
        xf = x.astype(jnp.promote_types(dtype, jnp.float32))
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.maximum(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) - jnp.square(mean), 0.0)
        y = (xf - mean) * jax.lax.rsqrt(var + 1e-6)
        return (y * self.scale + self.bias).astype(dtype)


class MultiHeadAttention(eqx.Module):
    """flax MultiHeadDotProductAttention: q/k/v kernels (width, heads, head_dim), out (heads, head_dim, width)."""

    query_kernel: Float[Array, "d n h"]
    query_bias: Float[Array, "n h"]
    key_kernel: Float[Array, "d n h"]
    key_bias: Float[Array, "n h"]
    value_kernel: Float[Array, "d n h"]
    value_bias: Float[Array, "n h"]
    out_kernel: Float[Array, "n h d"]
    out_bias: Float[Array, " d"]

    def __init__(self, width: int, num_heads: int, *, key: PRNGKeyArray):
        hd = width // num_heads
        kq, kk, kv, ko = jax.random.split(key, 4)
        init = jax.nn.initializers.xavier_uniform(in_axis=-3, out_axis=(-2, -1))
        self.query_kernel = init(kq, (width, num_heads, hd), jnp.float32)
        self.key_kernel = init(kk, (width, num_heads, hd), jnp.float32)
        self.value_kernel = init(kv, (width, num_heads, hd), jnp.float32)
        self.out_kernel = jax.nn.initializers.xavier_uniform(in_axis=(-3, -2), out_axis=-1)(
            ko, (num_heads, hd, width), jnp.float32
        )
        self.query_bias = self.key_bias = self.value_bias = jnp.zeros((num_heads, hd), jnp.float32)
        self.out_bias = jnp.zeros((width,), jnp.float32)

    def __call__(self, x: Float[Array, "b t d"]) -> Float[Array, "b t d"]:
        dt = x.dtype
        q = jnp.einsum("btd,dnh->btnh", x, self.query_kernel.astype(dt)) + self.query_bias.astype(dt)
        k = jnp.einsum("btd,dnh->btnh", x, self.key_kernel.astype(dt)) + self.key_bias.astype(dt)
        v = jnp.einsum("btd,dnh->btnh", x, self.value_kernel.astype(dt)) + self.value_bias.astype(dt)
        q = q / jnp.sqrt(q.shape[-1]).astype(dt)
        out = attention(q, k, v)  # logits and softmax in the compute dtype, as flax (no forced f32)
        return jnp.einsum("bqnh,nhd->bqd", out, self.out_kernel.astype(dt)) + self.out_bias.astype(dt)


class EncoderBlock(eqx.Module):
    norm_attn: LayerNorm
    attn: MultiHeadAttention
    norm_mlp: LayerNorm
    mlp_in: Dense
    mlp_out: Dense

    def __init__(self, cfg: SiglipConfig, *, key: PRNGKeyArray):
        ka, k1, k2 = jax.random.split(key, 3)
        self.norm_attn = LayerNorm(cfg.width)
        self.attn = MultiHeadAttention(cfg.width, cfg.num_heads, key=ka)
        self.norm_mlp = LayerNorm(cfg.width)
        self.mlp_in = Dense(cfg.width, cfg.mlp_dim, key=k1)
        self.mlp_out = Dense(cfg.mlp_dim, cfg.width, key=k2)

    def __call__(self, x: Float[Array, "b t d"]) -> Float[Array, "b t d"]:
        dt = x.dtype
        x = x + self.attn(self.norm_attn(x))
        h = jax.nn.gelu(self.mlp_in(self.norm_mlp(x), dtype=dt), approximate=True)
        return x + self.mlp_out(h, dtype=dt)


class Siglip(eqx.Module):
    patch_kernel: Float[Array, "p p c d"]
    patch_bias: Float[Array, " d"]
    pos_embedding: Float[Array, "1 n d"]
    blocks: EncoderBlock  # stacked: every leaf has a leading depth axis
    encoder_norm: LayerNorm
    head: Dense
    config: SiglipConfig = eqx.field(static=True)
    remat: bool = eqx.field(static=True)
    unroll: bool = eqx.field(static=True)

    def __init__(
        self, cfg: SiglipConfig, out_width: int, *, key: PRNGKeyArray, remat: bool = False, unroll: bool = False
    ):
        kp, kpos, kb = jax.random.split(key, 3)
        p, d = cfg.patch_size, cfg.width
        self.patch_kernel = jax.nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3)(
            kp, (p, p, 3, d), jnp.float32
        )
        self.patch_bias = jnp.zeros((d,), jnp.float32)
        self.pos_embedding = jax.random.normal(kpos, (1, cfg.num_patches, d), jnp.float32) / jnp.sqrt(d)
        self.blocks = stack(lambda k: EncoderBlock(cfg, key=k), kb, cfg.depth)
        self.encoder_norm = LayerNorm(d)
        self.head = Dense(d, out_width, key=kp, zero_init=True)  # big_vision head_zeroinit
        self.config = cfg
        self.remat = remat
        self.unroll = unroll

    def embed_patches(self, image: Float[Array, "b h w 3"]) -> Float[Array, "b n d"]:
        """Patch conv (VALID, stride = patch) + position embedding, in float32."""
        p = self.config.patch_size
        x = jax.lax.conv_general_dilated(
            image.astype(jnp.float32),
            self.patch_kernel,
            window_strides=(p, p),
            padding="VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        x = x + self.patch_bias
        b, h, w, d = x.shape
        return x.reshape(b, h * w, d) + self.pos_embedding

    def __call__(self, image: Float[Array, "b h w 3"], dtype=jnp.float32) -> Float[Array, "b n o"]:
        x = self.embed_patches(image).astype(dtype)
        x, _ = fold(lambda block, x, _: (block(x), None), self.blocks, x, remat=self.remat, unroll=self.unroll)
        return self.head(self.encoder_norm(x), dtype=dtype)
