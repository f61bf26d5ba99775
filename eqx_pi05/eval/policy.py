"""The evaluation policy: openpi client observations -> LIBERO action chunks, with our model.

The input chain is the data pipeline's own (`data.transforms.make_transforms(..., train=False)`):
LiberoInputs -> view_remove with the variant's *eval* probabilities -> quantile normalization ->
resize -> tokenize -> pad; the output chain is `libero_outputs` (unnormalize, first 7 dims). So a
variant trained with agentview removed is evaluated with agentview removed, by the same code.

Sampling noise comes from each observation's `noise_seed` (rollout.noise_seed: task, trial, call),
never from a running RNG: the same observation gives the same actions, whatever else is in the
batch and whether the run was resumed — which the removal audit and the batched/sequential
equivalence rely on.
"""

from __future__ import annotations

import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from eqx_pi05.compact import compact
from eqx_pi05.data import norm_stats as norm_stats_io
from eqx_pi05.data.norm_stats import NormStats
from eqx_pi05.data.tokenizer import Tokenizer
from eqx_pi05.data.transforms import Transforms, libero_outputs, make_transforms, stack
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
    batch_size: int | None = None,
    num_steps: int = 10,
) -> Policy:
    """A batched policy. `batch_size`: pad every call to this many samples (the worker count), so
    the jitted sampler compiles once; padding rows are dropped."""
    config = model.config
    base_key = jax.random.key(seed)

    def noise(seed_: int) -> jax.Array:
        return jax.random.normal(jax.random.fold_in(base_key, seed_), (config.action_horizon, config.action_dim))

    def policy(observations: list[dict]) -> np.ndarray:
        n = len(observations)
        if n == 0:
            raise ValueError("policy: called with no observations")
        seeds = [int(obs["noise_seed"]) for obs in observations]
        # The sample index drives view_remove's per-sample draw (deterministic per query for p < 1).
        samples = [transforms(obs, index=s) for obs, s in zip(observations, seeds)]
        pad = max(0, (batch_size or n) - n)
        batch = stack(samples + samples[-1:] * pad)
        eps = jnp.stack([noise(s) for s in seeds + seeds[-1:] * pad])
        # Slots no row attends to (the padding slot; agentview under view_remove) and the prompt's
        # trailing padding (to a bucket) are left out: the same function, without their tokens.
        obs = Observation.from_batch(trim_prompt(compact(batch)))
        actions = sample_actions(model, obs, eps, num_steps=num_steps)
        return libero_outputs(np.asarray(actions)[:n], norm_stats)

    return policy


def mechanism(cfg) -> str:
    """The results table's "Mechanism" of a TrainConfig (research report §05)."""
    d, data = cfg.distill, cfg.data
    if d is not None:
        removal = "curriculum" if d.schedule == "curriculum" else f"p={d.p:g}"
        if d.lam > 0:
            return f"distill λ={d.lam} + {removal}" if d.schedule == "curriculum" else f"distill λ={d.lam}"
        return "curriculum (in-loss)" if d.schedule == "curriculum" else f"in-loss removal {removal}"
    for name, probs in (("view_remove (physical)", data.view_remove.train), ("view_dropout (zeros)", data.view_dropout.train)):
        active = probs.active()
        if active:
            odd = ", ".join(f"{c} p={p:g}" for c, p in active.items() if c != "agentview" or p != 1.0)
            return f"{name} {odd}" if odd else name
    return "none"


def load_policy(
    checkpoint: str | pathlib.Path, params: str = "ema", batch_size: int = 1, seed: int = 0
) -> tuple[Policy, PolicyInfo]:
    """The policy of a train.py checkpoint: its model (EMA params by default), with the transform
    chain and eval-time camera removal of its training config, tokenizer and norm stats from the
    paths that config names."""
    from eqx_pi05.checkpoints import load_trained, step_dir  # noqa: PLC0415 - orbax only here

    directory = step_dir(checkpoint)
    model, cfg = load_trained(directory, params=params)
    used = "ema" if params == "ema" and (directory / "ema").is_dir() else "params"
    if used != params:
        log.warning("%s: the run kept no EMA (ema_decay=None), evaluating its raw params", directory)
    for what, path in (("norm stats", cfg.data.norm_stats), ("tokenizer", cfg.data.tokenizer)):
        if not pathlib.Path(path).is_file():
            raise FileNotFoundError(f"checkpoint {directory}: its config names {what} {path}, which is not a file "
                                    f"(relative paths are read from the current directory {pathlib.Path.cwd()})")
    stats = norm_stats_io.load(cfg.data.norm_stats)
    transforms = make_transforms(cfg.data, stats, Tokenizer(cfg.data.tokenizer, cfg.data.max_token_len), train=False)
    info = PolicyInfo(
        variant=cfg.name,
        backbone="LoRA" if cfg.is_lora else "full-FT",
        mechanism=mechanism(cfg),
        checkpoint=f"{directory} ({used})",
        view_remove_eval=cfg.data.view_remove.eval.active(),
        view_dropout_train=cfg.data.view_dropout.train.active(),
    )
    log.info("policy %s: %s, %s, eval view_remove %s", cfg.name, info.backbone, info.mechanism, info.view_remove_eval)
    return make_policy(model, transforms, stats, seed=seed, batch_size=batch_size), info
