"""Model sizes: plain frozen dataclasses, one named instance per variant.

Sizes follow openpi's `gemma.get_config` and SigLIP's `decode_variant` (see shared/SPEC-openpi.md §1).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

PALIGEMMA_VOCAB_SIZE = 257_152


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int
    alpha: float

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    lora: LoRAConfig | None = None  # applied to attention and MLP, as openpi's *_lora variants


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int = 14
    image_size: int = 224

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


GEMMA_2B = GemmaConfig(width=2048, depth=18, mlp_dim=16_384, num_heads=8, num_kv_heads=1, head_dim=256)
GEMMA_300M = GemmaConfig(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256)
GEMMA_2B_LORA = dataclasses.replace(GEMMA_2B, lora=LoRAConfig(rank=16, alpha=16.0))
GEMMA_300M_LORA = dataclasses.replace(GEMMA_300M, lora=LoRAConfig(rank=32, alpha=32.0))
GEMMA_DUMMY = GemmaConfig(width=64, depth=4, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=16)
GEMMA_DUMMY_LORA = dataclasses.replace(GEMMA_DUMMY, lora=LoRAConfig(rank=4, alpha=4.0))

SIGLIP_SO400M_14 = SiglipConfig(width=1152, depth=27, mlp_dim=4304, num_heads=16)
SIGLIP_TINY = SiglipConfig(width=32, depth=2, mlp_dim=64, num_heads=2)

GEMMA_VARIANTS: dict[str, GemmaConfig] = {
    "gemma_2b": GEMMA_2B,
    "gemma_300m": GEMMA_300M,
    "gemma_2b_lora": GEMMA_2B_LORA,
    "gemma_300m_lora": GEMMA_300M_LORA,
    "dummy": GEMMA_DUMMY,
    "dummy_lora": GEMMA_DUMMY_LORA,
}


@dataclasses.dataclass(frozen=True)
class Pi05Config:
    paligemma: GemmaConfig = GEMMA_2B
    action_expert: GemmaConfig = GEMMA_300M
    siglip: SiglipConfig = SIGLIP_SO400M_14
    vocab_size: int = PALIGEMMA_VOCAB_SIZE
    action_dim: int = 32
    action_horizon: int = 10
    max_token_len: int = 200
    # Compute dtype of activations and matmuls; params are always stored float32. Softmax, norms,
    # RoPE and the time embedding run in float32 whatever this says, as in openpi.
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    # Recompute every layer in the backward pass (openpi's nothing_saveable remat).
    remat: bool = True
    # Unroll the layer scans (same function). XLA's cost analysis counts a loop body once, so
    # FLOP counts need unrolled layers; otherwise leave it off (compile time grows with depth).
    unroll: bool = False
    # Freeze the vision tower (SigLIP and its projection) in training. With both experts LoRA this is
    # the research report's "frozen backbone" (~1.5 % trainable); openpi's LoRA filter keeps it trainable.
    freeze_vision: bool = False

    def __post_init__(self):
        a, b = self.paligemma, self.action_expert
        for field in ("depth", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(a, field) != getattr(b, field):
                raise ValueError(
                    f"joint attention needs equal {field} in both experts: paligemma {getattr(a, field)}, "
                    f"action_expert {getattr(b, field)}"
                )
        if a.num_heads % a.num_kv_heads:
            raise ValueError(f"num_heads {a.num_heads} is not a multiple of num_kv_heads {a.num_kv_heads}")
        if self.siglip.image_size % self.siglip.patch_size:
            raise ValueError(f"image_size {self.siglip.image_size} not divisible by patch {self.siglip.patch_size}")
        if b.width % 2:
            raise ValueError(f"action expert width {b.width} must be even for the sin-cos time embedding")


def pi05_full(**overrides) -> Pi05Config:
    """The real π0.5: So400m/14 + gemma_2b + gemma_300m (pi05_libero uses action_horizon 10)."""
    return Pi05Config(**overrides)


def pi05_tiny(**overrides) -> Pi05Config:
    """The fixture size: openpi's `dummy` Gemma for both experts, a tiny SigLIP, vocabulary 1024."""
    kw = dict(
        paligemma=GEMMA_DUMMY,
        action_expert=GEMMA_DUMMY,
        siglip=SIGLIP_TINY,
        vocab_size=1024,
        max_token_len=48,
        dtype="float32",
        remat=False,
    )
    kw.update(overrides)
    return Pi05Config(**kw)
