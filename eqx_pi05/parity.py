"""Parity with the reference on a golden fixture (contract: shared/fixtures/README.md).

    python -m eqx_pi05.parity FIXTURE_DIR [--tol 1e-5]

Loads the fixture's config and openpi params into our model, runs it in float32 on every case and
prints ‖ours − ref‖ / ‖ref‖ for v_t, loss and sample_actions (and, for locating a mismatch, the
intermediates the fixture carries). Exits non-zero if a compared output exceeds the tolerance.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import tyro

from eqx_pi05.cameras import SLOTS
from eqx_pi05.config import GemmaConfig, Pi05Config, SiglipConfig
from eqx_pi05.convert import openpi
from eqx_pi05.loss import bc_per_sample, flow_matching
from eqx_pi05.masks import make_attn_mask, make_positions
from eqx_pi05.model import Observation, Pi05, posemb_sincos, sample_actions

OUTPUTS = ("v_t", "loss", "sample_actions")


def fixture_config(cfg: dict) -> Pi05Config:
    """Our config from a fixture's config.json (sizes may differ from the shipped fixture)."""

    def gemma(d):
        return GemmaConfig(**{k: d[k] for k in ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim")})

    s, p = cfg["siglip"], cfg["pi0_config"]
    patch = s["patch_size"][0] if isinstance(s["patch_size"], list) else s["patch_size"]
    size = s.get("image_size", [224])[0] if isinstance(s.get("image_size", 224), list) else s.get("image_size", 224)
    return Pi05Config(
        paligemma=gemma(cfg["paligemma_llm"]),
        action_expert=gemma(cfg["action_expert"]),
        siglip=SiglipConfig(width=s["width"], depth=s["depth"], mlp_dim=s["mlp_dim"], num_heads=s["num_heads"], patch_size=patch, image_size=size),
        vocab_size=cfg["vocab_size"],
        action_dim=p["action_dim"],
        action_horizon=p["action_horizon"],
        max_token_len=p["max_token_len"],
        dtype="float32",
        remat=False,
    )


def load_fixture(path: str | os.PathLike) -> tuple[Pi05, dict[str, np.ndarray], Pi05Config]:
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"fixture {path}: no config.json")
    config = fixture_config(json.loads((path / "config.json").read_text()))
    if (path / "params.npz").exists():
        flat = dict(np.load(path / "params.npz"))
    elif (path / "params").is_dir():
        flat = openpi.read_checkpoint(path / "params")
    else:
        raise FileNotFoundError(f"fixture {path}: neither params.npz nor params/")
    cases = dict(np.load(path / "cases.npz"))
    return openpi.from_openpi(flat, config), cases, config


def case_names(cases: dict) -> list[str]:
    return sorted({k.split("/")[0] for k in cases if k.startswith("case_")})


def fixture_image(cases: dict, name: str) -> np.ndarray:
    """A camera's float32 image; derived from the uint8 one exactly as openpi does when absent."""
    if f"inputs/image/{name}" in cases:
        return cases[f"inputs/image/{name}"]
    return cases[f"inputs/image_uint8/{name}"].astype(np.float32) / 255.0 * 2.0 - 1.0


def observation(cases: dict, case: str) -> Observation:
    names = [k for k in SLOTS if f"inputs/image/{k}" in cases or f"inputs/image_uint8/{k}" in cases]
    batch = {k: cases[f"inputs/{k}"] for k in ("state", "tokenized_prompt", "tokenized_prompt_mask")}
    return Observation.from_batch(
        {**batch, "image": {k: fixture_image(cases, k) for k in names}, "image_mask": {k: cases[f"{case}/image_mask/{k}"] for k in names}}
    )


def compute_case(model: Pi05, cases: dict, case: str) -> dict[str, np.ndarray]:
    """Our outputs (and intermediates) for one case, with the fixture's noise and time."""
    obs = observation(cases, case)
    noise, actions, t = (jnp.asarray(cases[f"inputs/{k}"]) for k in ("noise", "actions", "time"))
    out = {
        "v_t": eqx.filter_jit(Pi05.velocity)(model, obs, flow_matching(actions, noise, t)[0], t),
        "loss": eqx.filter_jit(bc_per_sample)(model, obs, actions, noise, t),
        "sample_actions": sample_actions(model, obs, noise, num_steps=10),
    }
    prefix, prefix_mask, _ = eqx.filter_jit(Pi05.embed_prefix)(model, obs)
    _, _, _, cond = eqx.filter_jit(Pi05.embed_suffix)(model, jnp.asarray(cases[f"{case}/x_t"]), t)
    input_mask = jnp.concatenate([prefix_mask, jnp.ones(noise.shape[:2], bool)], axis=1)
    ar = jnp.concatenate([jnp.zeros(prefix.shape[1], bool), jnp.arange(noise.shape[1]) == 0])
    out.update(
        {
            "prefix_tokens": prefix,
            "prefix_mask": prefix_mask,
            "adarms_cond": cond,
            "positions": make_positions(input_mask),
            "attn_mask": make_attn_mask(input_mask, ar),
            "time_posemb": posemb_sincos(t, model.config.action_expert.width),
        }
    )
    return {k: np.asarray(v) for k, v in out.items()}


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        raise ValueError(f"shape mismatch: ours {ours.shape}, reference {ref.shape}")
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(ours - ref) / (denom if denom else 1.0))


def run(path: str | os.PathLike, tol: float = 1e-5, verbose: bool = True) -> dict[str, dict[str, float]]:
    model, cases, _ = load_fixture(path)
    results = {}
    for case in case_names(cases):
        ours = compute_case(model, cases, case)
        ref = {k: cases[f"{case}/{k}"] for k in ours if f"{case}/{k}" in cases}
        if "time_posemb" in ours and "intermediate/time_posemb" in cases:
            ref["time_posemb"] = cases["intermediate/time_posemb"]
        results[case] = {k: rel_err(ours[k], ref[k]) for k in ref}
        if verbose:
            row = "  ".join(f"{k}={results[case][k]:.2e}" for k in OUTPUTS if k in results[case])
            inter = "  ".join(f"{k}={v:.1e}" for k, v in results[case].items() if k not in OUTPUTS)
            print(f"{case}: {row}")
            print(f"{' ' * len(case)}  intermediates: {inter}")
    return results


@dataclasses.dataclass
class Args:
    fixture: tyro.conf.Positional[str]
    tol: float = 1e-5


def main(args: Args) -> int:
    results = run(args.fixture, args.tol)
    worst = max(r[k] for r in results.values() for k in OUTPUTS if k in r)
    missing = [f"{c}/{k}" for c, r in results.items() for k in OUTPUTS if k not in r]
    if missing:
        print(f"FAIL: fixture lacks {missing}")
        return 1
    status = "PASS" if worst <= args.tol else "FAIL"
    print(f"{status}: worst relative error {worst:.2e} (tolerance {args.tol:.0e})")
    return 0 if status == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
