"""The one transform chain from a LIBERO sample to a model input, shared by training and the policy.

Input (openpi client key names, one sample, no batch dim):
    {"observation/image": uint8 HWC (any size) or float CHW, "observation/wrist_image": same,
     "observation/state": (8,), "prompt": str, optional "actions": (H, 7)}
Output (what the model's batch holds per sample):
    {"image": {base_0_rgb, left_wrist_0_rgb, right_wrist_0_rgb: uint8 (224, 224, 3)},
     "image_mask": {same keys: bool}, "state": float32 (32,),
     "tokenized_prompt": int32 (L,), "tokenized_prompt_mask": bool (L,), optional "actions": float32 (H, 32)}

Order as openpi's pi05_libero (SPEC-openpi §5.2): LiberoInputs -> Normalize (quantile) -> resize to
224 -> tokenize -> pad to 32. `view_dropout` (train only) and `view_remove` sit right after
LiberoInputs, where the research report injects them. Outputs go back through `libero_outputs`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
from jaxtyping import Float

from eqx_pi05.data import images as _images
from eqx_pi05.data.data_config import DataConfig
from eqx_pi05.data.norm_stats import NormStats, quantile_normalize, quantile_unnormalize
from eqx_pi05.data.tokenizer import Tokenizer
from eqx_pi05.cameras import CAMERAS, PADDING_SLOT, CameraProbs, apply_view_dropout, apply_view_remove

MODEL_ACTION_DIM = 32
IMAGE_SIZE = 224
LIBERO_ACTION_DIM = 7


def libero_inputs(sample: dict) -> dict:
    """openpi `LiberoInputs` for pi0/pi05: each camera's client key -> its model slot (agentview ->
    base_0_rgb, wrist -> left_wrist_0_rgb), and the padding slot = zeros with mask False."""
    for key in (*(c.client_key for c in CAMERAS.values()), "observation/state"):
        if key not in sample:
            raise KeyError(f"libero_inputs: sample lacks {key!r}; it has {sorted(sample)}")
    image = {c.slot: _images.to_uint8_hwc(sample[c.client_key]) for c in CAMERAS.values()}
    out = {
        "state": np.asarray(sample["observation/state"], np.float32),
        "image": {**image, PADDING_SLOT: np.zeros_like(image[CAMERAS["agentview"].slot])},
        "image_mask": {**{s: np.True_ for s in image}, PADDING_SLOT: np.False_},
        "prompt": sample.get("prompt"),
    }
    if "actions" in sample:
        out["actions"] = np.asarray(sample["actions"], np.float32)
    return out


def normalize(data: dict, stats: dict[str, NormStats]) -> dict:
    """Quantile-normalize state (and actions when present) to about [-1, 1], before padding."""
    out = {**data, "state": quantile_normalize(data["state"], stats["state"])}
    if "actions" in data:
        out["actions"] = quantile_normalize(data["actions"], stats["actions"])
    return out


def resize_images(data: dict, size: int = IMAGE_SIZE) -> dict:
    return {**data, "image": {k: _images.resize_with_pad(v, size, size) for k, v in data["image"].items()}}


def tokenize(data: dict, tokenizer: Tokenizer, discrete_state_input: bool) -> dict:
    """Replace `prompt` with token ids and mask; the discrete-state format reads the normalized,
    unpadded state, which is why this runs before `pad_state_actions`."""
    if not data.get("prompt"):
        raise ValueError("tokenize: the sample has no prompt (the task instruction is required)")
    tokens, mask = tokenizer.tokenize(data["prompt"], data["state"] if discrete_state_input else None)
    out = {k: v for k, v in data.items() if k != "prompt"}
    return {**out, "tokenized_prompt": tokens, "tokenized_prompt_mask": mask}


def pad_state_actions(data: dict, dim: int = MODEL_ACTION_DIM) -> dict:
    """Zero-pad the last axis of state and actions to `dim` (the model's action_dim)."""
    out = {**data, "state": _pad(data["state"], dim, "state")}
    if "actions" in data:
        out["actions"] = _pad(data["actions"], dim, "actions")
    return out


def _pad(x: np.ndarray, dim: int, name: str) -> np.ndarray:
    if x.shape[-1] > dim:
        raise ValueError(f"pad {name}: expected at most {dim} values in the last axis, got shape {x.shape}")
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, dim - x.shape[-1])]).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Transforms:
    """`transform(sample, index)`: the whole chain for one sample.

    `index` identifies the sample for the view draws: the pipeline passes the global position in
    its shuffled stream; the policy server passes any running count of its queries.
    """

    norm_stats: dict[str, NormStats]
    tokenizer: Tokenizer
    discrete_state_input: bool
    action_horizon: int
    view_dropout_seed: int
    view_dropout: CameraProbs  # eval: the cameras fed as zeros (--eval-view deployed)
    view_remove_seed: int
    view_remove: CameraProbs  # the train or the eval probabilities

    def __call__(self, sample: dict, index: int) -> dict:
        data = libero_inputs(sample)
        if "actions" in data and data["actions"].shape[0] != self.action_horizon:
            raise ValueError(f"actions: expected a chunk of {self.action_horizon} steps, got shape {data['actions'].shape}")
        data = apply_view_dropout(data, index, self.view_dropout_seed, self.view_dropout)
        data = apply_view_remove(data, index, self.view_remove_seed, self.view_remove)
        data = normalize(data, self.norm_stats)
        data = resize_images(data)
        data = tokenize(data, self.tokenizer, self.discrete_state_input)
        return pad_state_actions(data)


# What the policy is given at evaluation for a camera a `view_dropout` variant was trained to do
# without: "deployed" = zeros with mask True always (a robot that has no such camera); "real" = the
# camera's real frame (view_dropout is train-only: the research report's pipeline, its B1 number).
# `view_remove` variants are evaluated with their view_remove.eval under both.
EvalView = Literal["deployed", "real"]
EVAL_VIEWS: tuple[str, ...] = ("deployed", "real")


def make_transforms(
    cfg: DataConfig, norm_stats: dict[str, NormStats], tokenizer: Tokenizer, train: bool, eval_view: EvalView = "deployed"
) -> Transforms:
    """The chain for training (`train=True`: view_dropout + view_remove.train) or for the policy
    at evaluation (`train=False`: view_remove.eval, and `eval_view`'s treatment of view_dropout cameras)."""
    if tokenizer.max_len != cfg.max_token_len:
        raise ValueError(f"tokenizer max_len {tokenizer.max_len} != DataConfig.max_token_len {cfg.max_token_len}")
    if eval_view not in EVAL_VIEWS:
        raise ValueError(f"eval_view: expected one of {EVAL_VIEWS}, got {eval_view!r}")
    deployed = CameraProbs(**{c: 1.0 for c in cfg.view_dropout.train.active()}) if eval_view == "deployed" else CameraProbs()
    return Transforms(
        norm_stats=norm_stats,
        tokenizer=tokenizer,
        discrete_state_input=cfg.discrete_state_input,
        action_horizon=cfg.action_horizon,
        view_dropout_seed=cfg.view_dropout.seed,
        view_dropout=cfg.view_dropout.train if train else deployed,
        view_remove_seed=cfg.view_remove.seed,
        view_remove=cfg.view_remove.train if train else cfg.view_remove.eval,
    )


def libero_outputs(actions: Float[np.ndarray, "*b h d"], norm_stats: dict[str, NormStats]) -> Float[np.ndarray, "*b h 7"]:
    """Model actions (normalized, padded to 32) -> LIBERO actions: quantile-unnormalize, keep 7 dims
    (openpi's output chain Unnormalize -> LiberoOutputs)."""
    return quantile_unnormalize(np.asarray(actions, np.float64), norm_stats["actions"])[..., :LIBERO_ACTION_DIM]


def stack(samples: list[dict]) -> dict:
    """Batch per-sample dicts along a new leading axis (for the policy, which sees one sample at a time)."""
    if not samples:
        raise ValueError("stack: no samples")
    return _stack_leaves(samples)


def _stack_leaves(items: list):
    if isinstance(items[0], dict):
        return {k: _stack_leaves([item[k] for item in items]) for k in items[0]}
    return np.stack([np.asarray(item) for item in items])

