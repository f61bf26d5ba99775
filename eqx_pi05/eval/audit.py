"""The removal audit, run before any episode (research report, B2 card: "a suspiciously high SR
usually means the view was not actually removed").

A camera the policy must not see at eval is one `view_remove` removes (mask False) or, under
`--eval-view deployed`, one a `view_dropout` variant was trained to do without (fed as zeros with
mask True, what a robot without that camera gives). The policy is called on one observation whose
hidden cameras carry random noise, then on the same observation with different noise: the actions
must be bit-identical. A policy that reads a camera it should not see fails loudly, before a single
episode is spent. Under `--eval-view real` a `view_dropout` variant sees every camera (the
research report's pipeline), and the line says so instead.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from eqx_pi05.cameras import CAMERAS
from eqx_pi05.eval.rollout import Policy

log = logging.getLogger(__name__)


class RemovalAuditError(RuntimeError):
    """The policy's actions depend on a camera that is configured as removed."""


def _settings(probs: Mapping[str, float]) -> str:
    return "{" + ",".join(f"{camera}={p:g}" for camera, p in probs.items()) + "}"


def _with_noise(observation: dict, cameras: list[str], seed: int) -> dict:
    rng = np.random.default_rng(seed)
    out = dict(observation)
    for camera in cameras:
        key = CAMERAS[camera].client_key
        out[key] = rng.integers(0, 256, np.shape(observation[key]), dtype=np.uint8)
    return out


def _actions(policy: Policy, observation: dict) -> np.ndarray:
    return np.asarray(policy([observation]))[0]


def audit_removal(
    policy: Policy,
    observation: dict,
    view_remove_eval: Mapping[str, float],
    view_dropout_train: Mapping[str, float],
    view_dropout_eval: Mapping[str, float] | None = None,
) -> str:
    """Check the eval-time camera removal on `policy`; return the log line, or raise RemovalAuditError.

    `view_remove_eval` / `view_dropout_train` / `view_dropout_eval` (zeros fed at eval, --eval-view
    deployed): camera -> probability (0 entries are ignored).
    `observation`: an openpi client observation (rollout.policy_observation), including its noise_seed.
    """
    removed = {c: p for c, p in view_remove_eval.items() if p > 0}
    dropped = {c: p for c, p in view_dropout_train.items() if p > 0}
    zeroed = {c: p for c, p in (view_dropout_eval or {}).items() if p > 0}
    for camera in [*removed, *dropped, *zeroed]:
        if camera not in CAMERAS:
            raise ValueError(f"camera removal audit: unknown camera {camera!r}, expected one of {list(CAMERAS)}")
    parts = [f"eval physical view-removal {_settings(removed)}"] if removed else []
    parts += [f"eval view_dropout {_settings(zeroed)} as deployed: zeros with mask True"] if zeroed else []
    what = "; ".join(parts)
    if not parts and dropped:
        return (f"eval view_dropout (zeros) {_settings(dropped)} is train-only: every camera reaches the "
                "policy at eval (--eval-view real, the report's pipeline), nothing is removed, no removal audit")
    if not parts:
        return "eval no camera removal: every camera reaches the policy"
    audited = [c for c, p in {**removed, **zeroed}.items() if p >= 1.0]
    if not audited:
        return f"{what} is stochastic (p < 1): audit=skipped"
    failed = f"{what} audit=FAIL"
    first = _actions(policy, _with_noise(observation, audited, seed=1))
    _require_equal(first, _actions(policy, _with_noise(observation, audited, seed=1)), failed,
                   "the policy is not deterministic for a fixed observation; it must draw its sampling noise "
                   "from the observation's noise_seed for the audit (and batched evaluation) to be exact")
    _require_equal(first, _actions(policy, _with_noise(observation, audited, seed=2)), failed,
                   f"replacing the pixels of {audited} with other noise changed the actions; the policy reads a "
                   "camera that is configured as removed")
    visible = [c for c in CAMERAS if c not in audited]
    if visible and np.array_equal(first, _actions(policy, _with_noise(observation, audited + visible, seed=3))):
        log.warning("removal audit: noise on the visible camera(s) %s did not change the actions either; "
                    "the policy may ignore its images altogether", visible)
    return f"{what} audit=pass"


def _require_equal(a: np.ndarray, b: np.ndarray, failed: str, why: str) -> None:
    if not np.array_equal(a, b):
        raise RemovalAuditError(f"{failed}: {why} (max |diff| {np.max(np.abs(a - b)):.3g})")
