"""Every checkpoint reader and writer: the one module train, eval and serve call.

- openpi params (orbax PyTree, released or trainer layout): `load_openpi` (eqx_pi05.convert.openpi);
- LeRobot `model.safetensors`: `load_lerobot` (eqx_pi05.convert.lerobot);
- `load_weights` picks one of the two by what is on disk;
- our trainer layout, below.

Trainer layout: orbax CheckpointManager under OUTPUT_DIR/checkpoints/<step>/ with the items

    params   the model (trainable + frozen leaves), an eqx Pi05 tree
    ema      the EMA of the trainable leaves (absent when ema_decay is None)
    train    {opt_state, step, rng}
    data     the Grain iterator state (one file per process)
    config   the run's TrainConfig as JSON (model, data incl. view_dropout/view_remove, variant)
    assets   what the policy needs besides the weights and the config: the norm stats and the
             tokenizer model (its bytes), read once from the config's paths when the run starts
             (`policy_assets`); evaluation and serving read them from here (`read_assets`), never
             from those paths, so replacing a file there cannot change an evaluated policy

<step> is the number of completed steps. orbax writes into a temporary directory and renames it
when complete, so a killed save leaves the previous checkpoint the latest; saves run in the
background (`async_checkpoint`), and keep the newest `keep_checkpoints`.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import pathlib

import equinox as eqx
import jax
import orbax.checkpoint as ocp
from grain import checkpoint as grain_checkpoint

from eqx_pi05.config import Pi05Config
from eqx_pi05.convert import lerobot, openpi
from eqx_pi05.convert.openpi import abstract_model
from eqx_pi05.data import norm_stats
from eqx_pi05.data.norm_stats import NormStats
from eqx_pi05.data.transforms import LIBERO_ACTION_DIM
from eqx_pi05.model import Pi05
from eqx_pi05.train.config import TrainConfig, from_json, to_json
from eqx_pi05.trainable import trainable_filter

load_openpi = openpi.load_checkpoint
load_lerobot = lerobot.load


def load_weights(path: str | os.PathLike, config: Pi05Config, *, lora_seed: int | None = None) -> Pi05:
    """A model of `config` from an openpi params checkpoint or a LeRobot `model.safetensors` (a file,
    or a directory holding one). `lora_seed`: initialise the LoRA adapters the weights lack."""
    local = pathlib.Path(path)  # a URL (gs://...) stays a string: orbax reads it, a Path would fold gs:// into gs:/
    if "://" not in str(path) and (local.suffix == ".safetensors" or (local / "model.safetensors").is_file()):
        return load_lerobot(local, config, lora_seed=lora_seed)
    return load_openpi(path, config, lora_seed=lora_seed)


def manager(directory: pathlib.Path, keep: int = 1, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options)


ASSETS_FORMAT = 1


def policy_assets(cfg: TrainConfig) -> dict:
    """The `assets` item of `cfg`'s checkpoints (JSON): norm stats in openpi's layout, the tokenizer
    model base64-encoded with its sha256, the environment's action dims, and where each was read."""
    proto = pathlib.Path(cfg.data.tokenizer).read_bytes()
    return {
        "format": ASSETS_FORMAT,
        **norm_stats.to_json(norm_stats.load(cfg.data.norm_stats)),
        "norm_stats_source": str(cfg.data.norm_stats),
        "tokenizer_model": base64.b64encode(proto).decode("ascii"),
        "tokenizer_sha256": hashlib.sha256(proto).hexdigest(),
        "tokenizer_source": str(cfg.data.tokenizer),
        "action_dim": LIBERO_ACTION_DIM,
        "model_action_dim": cfg.model.action_dim,
    }


def save(mgr: ocp.CheckpointManager, state, data_iter, cfg: TrainConfig, assets: dict | None = None) -> int:
    """Save `state` as checkpoint <state.step>; returns that step. `assets`: `policy_assets(cfg)`,
    computed once per run by the caller (None: read now)."""
    step = int(state.step)
    items = dict(
        params=ocp.args.StandardSave(state.model()),
        train=ocp.args.StandardSave({"opt_state": state.opt_state, "step": state.step, "rng": state.rng}),
        data=grain_checkpoint.CheckpointSave(data_iter),
        config=ocp.args.JsonSave(to_json(cfg)),
        assets=ocp.args.JsonSave(policy_assets(cfg) if assets is None else assets),
    )
    if state.ema is not None:
        items["ema"] = ocp.args.StandardSave(state.ema)
    mgr.save(step, args=ocp.args.Composite(**items))
    return step


def restore(mgr: ocp.CheckpointManager, target, data_iter, step: int | None = None):
    """The state of checkpoint `step` (default: the latest) laid out like `target` (abstract leaves
    with shardings; a train.state.TrainState, of whose type the result is); `data_iter` is moved to
    where that run's iterator was."""
    step = mgr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {mgr.directory}")
    items = dict(
        params=ocp.args.StandardRestore(target.model()),
        train=ocp.args.StandardRestore({"opt_state": target.opt_state, "step": target.step, "rng": target.rng}),
        data=grain_checkpoint.CheckpointRestore(data_iter),
    )
    if target.ema is not None:
        items["ema"] = ocp.args.StandardRestore(target.ema)
    out = mgr.restore(step, args=ocp.args.Composite(**items))
    params, frozen = eqx.partition(out["params"], trainable_filter(out["params"]))
    train = out["train"]
    return type(target)(step=train["step"], params=params, frozen=frozen, opt_state=train["opt_state"],
                      ema=out["ema"] if target.ema is not None else None, rng=train["rng"])


def step_dir(path: str | pathlib.Path) -> pathlib.Path:
    """A checkpoint step directory from a run's output dir, its checkpoints/ dir (latest step) or a step dir."""
    path = pathlib.Path(path).absolute()
    if (path / "params").is_dir():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = sorted((int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "params").is_dir()), reverse=True) if root.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"no train.py checkpoint at {path}: expected a run directory, its checkpoints/ or a step directory")
    return root / str(steps[0])


def read_config(path: str | pathlib.Path) -> TrainConfig:
    """The TrainConfig a checkpoint was written with."""
    directory = step_dir(path)
    return from_json(ocp.JsonCheckpointHandler().restore(directory / "config"))


@dataclasses.dataclass(frozen=True)
class PolicyAssets:
    """A checkpoint's assets, decoded."""

    norm_stats: dict[str, NormStats]
    tokenizer_model: bytes  # the SentencePiece model file
    tokenizer_source: str
    action_dim: int
    origin: str  # where they were read: "checkpoint", or the config's paths for an old checkpoint

    @property
    def fingerprint(self) -> str:
        """sha256 (first 16 hex) of the norm stats and tokenizer: equal fingerprints, equal assets."""
        stats = repr(norm_stats.to_json(self.norm_stats)).encode()
        return hashlib.sha256(stats + self.tokenizer_model).hexdigest()[:16]


def read_assets(path: str | pathlib.Path, from_config_paths: bool = False) -> PolicyAssets:
    """The norm stats and tokenizer stored in a checkpoint.

    A checkpoint written before the assets were stored has none: that is an error naming the
    directory, unless `from_config_paths`, which reads the files its config names today (what
    evaluation did before) and says so in `origin`.
    """
    directory = step_dir(path)
    if not (directory / "assets").is_dir():
        if not from_config_paths:
            raise FileNotFoundError(
                f"checkpoint {directory} has no 'assets' item (norm stats + tokenizer), it was written before "
                "train.py stored them; pass --assets-from-config to read the files its config names instead "
                "(they must be the ones it was trained with: nothing can check that)")
        cfg = read_config(directory)
        stats, proto = norm_stats.load(cfg.data.norm_stats), pathlib.Path(cfg.data.tokenizer).read_bytes()
        return PolicyAssets(stats, proto, str(cfg.data.tokenizer), LIBERO_ACTION_DIM,
                            f"config paths {cfg.data.norm_stats}, {cfg.data.tokenizer} (checkpoint without assets)")
    data = ocp.JsonCheckpointHandler().restore(directory / "assets")
    where = str(directory / "assets")
    if data.get("format") != ASSETS_FORMAT:
        raise ValueError(f"{where}: format {data.get('format')!r}, expected {ASSETS_FORMAT}")
    proto = base64.b64decode(data["tokenizer_model"])
    if hashlib.sha256(proto).hexdigest() != data["tokenizer_sha256"]:
        raise ValueError(f"{where}: the stored tokenizer model does not match its sha256 {data['tokenizer_sha256']}")
    stats = norm_stats.from_json(data, where)
    if data["action_dim"] != LIBERO_ACTION_DIM or stats["actions"].q01.shape != (data["action_dim"],):
        raise ValueError(f"{where}: action_dim {data['action_dim']} with action stats of shape "
                         f"{stats['actions'].q01.shape}; this evaluation drives LIBERO's {LIBERO_ACTION_DIM}-dim actions")
    return PolicyAssets(stats, proto, data["tokenizer_source"], data["action_dim"], "checkpoint")


def load_trained(path: str | pathlib.Path, params: str = "ema") -> tuple[Pi05, TrainConfig]:
    """(model, run config) of a train.py checkpoint on one device; `params`: "ema" (default, the
    EMA weights as openpi evaluates; falls back to the raw params when the run kept no EMA) or "params"."""
    if params not in ("ema", "params"):
        raise ValueError(f"params: expected 'ema' or 'params', got {params!r}")
    directory = step_dir(path)
    cfg = read_config(directory)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    on_device = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)  # noqa: E731
    template = on_device(abstract_model(cfg.model))
    with ocp.StandardCheckpointer() as ckptr:
        model = ckptr.restore(directory / "params", template)
        if params == "ema" and (directory / "ema").is_dir():
            trainable, frozen = eqx.partition(model, trainable_filter(model))
            model = eqx.combine(ckptr.restore(directory / "ema", on_device(trainable)), frozen)
    return model, cfg
