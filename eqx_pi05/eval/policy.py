"""The evaluation policy: openpi client observations -> LIBERO action chunks, with our model.

The input chain is the data pipeline's own (`data.transforms.make_transforms(..., train=False)`):
LiberoInputs -> view_dropout as `--eval-view` says -> view_remove with the variant's *eval*
probabilities -> quantile normalization -> resize -> tokenize -> pad; the output chain is
`libero_outputs` (unnormalize, first 7 dims). So a variant trained with agentview removed is
evaluated with agentview removed, by the same code. Norm stats and tokenizer are the checkpoint's
own (train/checkpoint.py `assets`), not the files its config names.

An observation's actions depend on nothing else: the sampling noise comes from its `noise_seed`
(rollout.noise_seed: task, trial, call), never from a running RNG, and the model always runs at
one fixed batch (`batch_size` rows, unused rows padded; more observations take more calls), since
the same observation at batch 1 and 2 gives actions ~1e-7 apart (float reassociation), which a
closed loop amplifies into another episode. The removal audit, resumed runs and the equality of
runs with any number of simulator workers rely on it.
"""

from __future__ import annotations

import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from eqx_pi05 import cameras
from eqx_pi05.data.norm_stats import NormStats
from eqx_pi05.data.tokenizer import Tokenizer
from eqx_pi05.data.transforms import EvalView, Transforms, libero_outputs, make_transforms, stack
from eqx_pi05.eval.rollout import Policy
from eqx_pi05.eval.run import PolicyInfo
from eqx_pi05.model import Observation, Pi05, sample_actions
from eqx_pi05.prompt import trim_prompt

log = logging.getLogger(__name__)


def make_policy(
    model: Pi05,
    transforms: Transforms,
    norm_stats: dict[str, NormStats],
    seed: int = 0,
    batch_size: int = 1,
    num_steps: int = 10,
) -> Policy:
    """A batched policy whose model calls all have `batch_size` rows (one compiled program, and
    actions that do not depend on how many observations came together)."""
    if batch_size < 1:
        raise ValueError(f"policy batch_size: expected >= 1, got {batch_size}")
    config = model.config
    base_key = jax.random.key(seed)
    # Slots no row ever attends to, decided by the config, not by the batch (a batch-dependent
    # choice would make a row's actions depend on its batch mates): the padding slot, and cameras
    # the eval transforms always remove. Leaving them out is the same function, less compute.
    never_seen = [cameras.PADDING_SLOT, *transforms.view_remove.always()]

    def noise(seed_: int) -> jax.Array:
        return jax.random.normal(jax.random.fold_in(base_key, seed_), (config.action_horizon, config.action_dim))

    def call(samples: list[dict], seeds: list[int]) -> np.ndarray:
        pad = batch_size - len(samples)
        batch = stack(samples + samples[-1:] * pad)
        eps = jnp.stack([noise(s) for s in seeds + seeds[-1:] * pad])
        # The prompt's trailing padding is cut to a bucket of the call's longest prompt (LIBERO's 15-21
        # tokens are all in the 32 bucket, so that is no batch mate's doing either).
        obs = Observation.from_batch(trim_prompt(cameras.drop(batch, never_seen)))
        actions = sample_actions(model, obs, eps, num_steps=num_steps)
        return np.asarray(actions)[: len(samples)]

    def policy(observations: list[dict]) -> np.ndarray:
        if not observations:
            raise ValueError("policy: called with no observations")
        seeds = [int(obs["noise_seed"]) for obs in observations]
        # The sample index drives view_remove's per-sample draw (deterministic per query for p < 1).
        samples = [transforms(obs, index=s) for obs, s in zip(observations, seeds)]
        parts = [call(samples[i : i + batch_size], seeds[i : i + batch_size]) for i in range(0, len(samples), batch_size)]
        return libero_outputs(np.concatenate(parts), norm_stats)

    return policy


def backbone(cfg) -> str:
    """The results table's "Backbone" of a TrainConfig: LoRA or full fine-tuning of loaded weights, or a model
    trained from its random initialisation (no `weights`)."""
    if cfg.is_lora:
        return "LoRA"
    return "full-FT" if cfg.weights is not None else "from scratch"


def mechanism(cfg) -> str:
    """The results table's "Mechanism" of a TrainConfig (research report §05)."""
    d, data = cfg.distill, cfg.data
    if d is not None:
        removal = "curriculum" if d.schedule == "curriculum" else f"p={d.p:g}"
        if d.lam > 0:
            return f"distill λ={d.lam} + {removal}" if d.schedule == "curriculum" else f"distill λ={d.lam}"
        return "curriculum (in-loss)" if d.schedule == "curriculum" else f"in-loss removal {removal}"
    zeros = "view_dropout (zeros)" if cfg.augment_black_frames else "view_dropout (zeros, kept black)"
    for name, probs in (("view_remove (physical)", data.view_remove.train), (zeros, data.view_dropout.train)):
        active = probs.active()
        if active:
            odd = ", ".join(f"{c} p={p:g}" for c, p in active.items() if c != "agentview" or p != 1.0)
            return f"{name} {odd}" if odd else name
    return "none"


def load_policy(
    checkpoint: str | pathlib.Path,
    params: str = "ema",
    batch_size: int = 1,
    seed: int = 0,
    eval_view: EvalView = "deployed",
    assets_from_config: bool = False,
) -> tuple[Policy, PolicyInfo]:
    """The policy of a train.py checkpoint: its model (EMA params by default), with the transform
    chain and eval-time camera removal of its training config (`eval_view` for view_dropout
    variants), norm stats and tokenizer from the checkpoint's assets (`assets_from_config`: from the
    paths its config names, for a checkpoint written before train.py stored them)."""
    from eqx_pi05.checkpoints import exported, load_trained, read_assets, step_dir  # noqa: PLC0415 - orbax only here

    directory = step_dir(checkpoint)
    assets = read_assets(directory, from_config_paths=assets_from_config)
    model, cfg = load_trained(directory, params=params)
    export = exported(directory)
    used = export["params"] if export else "ema" if params == "ema" and (directory / "ema").is_dir() else "params"
    if used != params:
        log.warning("%s: the run kept no EMA (ema_decay=None), evaluating its raw params", directory)
    if assets.origin != "checkpoint":
        log.warning("%s: norm stats and tokenizer read from %s", directory, assets.origin)
    tokenizer = Tokenizer(assets.tokenizer_source, cfg.data.max_token_len, proto=assets.tokenizer_model)
    transforms = make_transforms(cfg.data, assets.norm_stats, tokenizer, train=False, eval_view=eval_view)
    info = PolicyInfo(
        variant=cfg.name,
        backbone=backbone(cfg),
        mechanism=mechanism(cfg),
        checkpoint=f"{directory} ({used})",
        view_remove_eval=transforms.view_remove.active(),
        view_dropout_train=cfg.data.view_dropout.train.active(),
        eval_view=eval_view,
        view_dropout_eval=transforms.view_dropout.active(),
        assets=f"{assets.origin} sha256:{assets.fingerprint}",
        policy_batch=batch_size,
    )
    log.info("policy %s: %s, %s, eval view %s (view_remove %s, zeros %s), assets %s", cfg.name, info.backbone,
             info.mechanism, eval_view, info.view_remove_eval, info.view_dropout_eval, info.assets)
    return make_policy(model, transforms, assets.norm_stats, seed=seed, batch_size=batch_size), info
