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
    checksums  {item: {leaf path: checksum of its bits}} of params, ema and train

A policy-only copy (`export_policy`, for committing or shipping a trained policy) keeps one step dir
with `params` (the weights to evaluate, e.g. the EMA combined with the frozen leaves), config,
assets, checksums and `export` ({source, params}); no optimizer state, data iterator or second copy.

<step> is the number of completed steps. orbax writes into a temporary directory and renames it
when complete, so a killed save leaves the previous checkpoint the latest; saves run in the
background (`async_checkpoint`), and keep the newest `keep_checkpoints` (2 by default, so a
corrupt latest one has an intact one behind it). Every restore compares the arrays with their
checksums (a truncated or altered file is found, not trained on), and a state holding NaN or inf
is never saved: the latest checkpoint is always a good one.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import logging
import os
import pathlib
import shutil

import equinox as eqx
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from grain import checkpoint as grain_checkpoint

from eqx_pi05.config import Pi05Config
from eqx_pi05.convert import lerobot, openpi
from eqx_pi05.convert.openpi import abstract_model
from eqx_pi05.data import norm_stats
from eqx_pi05.data.norm_stats import NormStats
from eqx_pi05.data.transforms import LIBERO_ACTION_DIM
from eqx_pi05.model import Pi05
from eqx_pi05.trainable import trainable_filter
from eqx_pi05.variants import TrainConfig, from_json, to_json

log = logging.getLogger(__name__)

load_openpi = openpi.load_checkpoint
load_lerobot = lerobot.load


def load_weights(path: str | os.PathLike, config: Pi05Config, *, lora_seed: int | None = None) -> Pi05:
    """A model of `config` from an openpi params checkpoint or a LeRobot `model.safetensors` (a file,
    or a directory holding one). `lora_seed`: initialise the LoRA adapters the weights lack."""
    local = pathlib.Path(path)  # a URL (gs://...) stays a string: orbax reads it, a Path would fold gs:// into gs:/
    if "://" not in str(path) and (local.suffix == ".safetensors" or (local / "model.safetensors").is_file()):
        return load_lerobot(local, config, lora_seed=lora_seed)
    return load_openpi(path, config, lora_seed=lora_seed)


def manager(directory: pathlib.Path, keep: int = 2, async_save: bool = True) -> ocp.CheckpointManager:
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


class CorruptCheckpoint(ValueError):
    """A checkpoint whose arrays do not match the checksums written with it, or that cannot be read."""


def _bits(x: jax.Array) -> jax.Array:
    """The raw bits of `x` as uint32 (1-, 2- and 4-byte dtypes)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)


@jax.jit
def _digest(tree) -> tuple[list[jax.Array], list[jax.Array]]:
    """Per leaf: a checksum of its bits (sum of bits x an odd weight per position, mod 2**32, so any
    one flipped bit changes it) and whether every value is finite."""
    # read on the device (an EMA kept in pinned host memory, TrainConfig.ema_memory="host", is copied)
    leaves = [jax.device_put(x, jax.memory.Space.Device) for x in jax.tree.leaves(tree)]
    sums = [jnp.sum(_bits(x).reshape(-1) * (2 * jnp.arange(x.size, dtype=jnp.uint32) + 1), dtype=jnp.uint32) for x in leaves]
    finite = [jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True) for x in leaves]
    return sums, finite


def checksums(tree) -> tuple[dict[str, int], list[str]]:
    """({leaf path: checksum}, [paths of leaves holding NaN or inf]) of a pytree of arrays; the one
    host sync is here."""
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    sums, finite = jax.device_get(_digest(tree))
    return {p: int(c) for p, c in zip(paths, sums, strict=True)}, [p for p, ok in zip(paths, finite, strict=True) if not ok]


def _items(state) -> dict[str, object]:
    items = {"params": state.model(), "train": {"opt_state": state.opt_state, "step": state.step, "rng": state.rng}}
    return items if state.ema is None else {**items, "ema": state.ema}


def save(mgr: ocp.CheckpointManager, state, data_iter, cfg: TrainConfig, assets: dict | None = None) -> int:
    """Save `state` as checkpoint <state.step> with a checksum of every array; returns that step.
    A state with a non-finite param (or EMA) is never written: FloatingPointError naming the leaf.
    `assets`: `policy_assets(cfg)`, computed once per run by the caller (None: read now)."""
    step = int(state.step)
    trees = _items(state)
    sums = {}
    for name, tree in trees.items():
        sums[name], bad = checksums(tree)
        if bad and name != "train":
            mgr.wait_until_finished()
            raise FloatingPointError(f"{name} hold non-finite values at step {step} ({', '.join(bad[:3])}): not saved; {last_good(mgr)}")
    items = {name: ocp.args.StandardSave(tree) for name, tree in trees.items()}
    items.update(data=grain_checkpoint.CheckpointSave(data_iter), config=ocp.args.JsonSave(to_json(cfg)),
                 assets=ocp.args.JsonSave(policy_assets(cfg) if assets is None else assets),
                 checksums=ocp.args.JsonSave(sums))
    mgr.save(step, args=ocp.args.Composite(**items))
    return step


def last_good(mgr: ocp.CheckpointManager) -> str:
    """Where a stopped run can resume from (every saved checkpoint is finite and verified)."""
    mgr.wait_until_finished()
    step = mgr.latest_step()
    return f"no checkpoint was saved yet in {mgr.directory}" if step is None else f"the last good checkpoint is step {step} in {mgr.directory}"


def verify(directory: pathlib.Path, name: str, tree) -> None:
    """Compare `tree` (item `name` as restored from step dir `directory`) with the checksums saved
    with it; CorruptCheckpoint names the first leaves that differ. Checkpoints written before
    checksums existed pass with a warning."""
    if not (directory / "checksums").is_dir():
        log.warning("checkpoint %s has no checksums (written by an older version): not verified", directory)
        return
    saved = ocp.JsonCheckpointHandler().restore(directory / "checksums")[name]
    found, _ = checksums(tree)
    differ = [p for p in saved.keys() | found.keys() if saved.get(p) != found.get(p)]
    if differ:
        raise CorruptCheckpoint(f"checkpoint {directory}: {name}{sorted(differ)[0]} does not match its checksum "
                                f"({len(differ)} array(s) differ): the files were altered or truncated")


def restore(directory: pathlib.Path, target, data_iter, keep: int = 2, async_save: bool = True):
    """(state, manager, corrupt) from the newest intact checkpoint under `directory`, laid out like
    `target` (abstract leaves with shardings; a train.state.TrainState, of whose type the state is);
    `data_iter` is moved to where that run's iterator was. A checkpoint that fails to read or to
    verify is reported by step (a warning) and the next older one is tried; `corrupt` lists those
    steps. FileNotFoundError when there is none, CorruptCheckpoint when none is intact."""
    mgr = manager(directory, keep, async_save)
    steps = sorted(mgr.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {mgr.directory}")
    problems = {}
    for step in steps:
        try:
            return _restore_step(mgr, step, target, data_iter), mgr, sorted(problems)
        except Exception as err:  # noqa: BLE001 - any failure to read a checkpoint is a reason to try the previous one
            problems[step] = err if isinstance(err, CorruptCheckpoint) else f"cannot be read ({type(err).__name__}: {str(err)[:300]})"
            log.warning("checkpoint step %d in %s is corrupt: %s", step, mgr.directory, problems[step])
    report = "; ".join(f"step {s}: {e}" for s, e in problems.items())
    raise CorruptCheckpoint(f"no intact checkpoint in {mgr.directory}: {report}")


def _restore_step(mgr: ocp.CheckpointManager, step: int, target, data_iter):
    trees = _items(target)
    items = {name: ocp.args.StandardRestore(tree) for name, tree in trees.items()}
    out = mgr.restore(step, args=ocp.args.Composite(**items, data=grain_checkpoint.CheckpointRestore(data_iter)))
    directory = pathlib.Path(mgr.directory) / str(step)
    for name in trees:
        verify(directory, name, out[name])
    params, frozen = eqx.partition(out["params"], trainable_filter(out["params"]))
    train = out["train"]
    return type(target)(step=train["step"], params=params, frozen=frozen, opt_state=train["opt_state"],
                        ema=out.get("ema"), rng=train["rng"])


def set_aside(directory: pathlib.Path, steps: list[int]) -> list[pathlib.Path]:
    """Rename corrupt step directories to `corrupt-<step>` (kept for inspection, out of orbax's way)."""
    moved = []
    for step in steps:
        src, dst = pathlib.Path(directory) / str(step), pathlib.Path(directory) / f"corrupt-{step}"
        if src.is_dir():
            src.rename(dst)
            moved.append(dst)
    return moved


def _step_dirs(path: str | pathlib.Path) -> list[pathlib.Path]:
    """Checkpoint step directories, newest first, of a run's output dir, its checkpoints/ dir or a step dir."""
    path = pathlib.Path(path).absolute()
    if (path / "params").is_dir():
        return [path]
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = sorted((int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "params").is_dir()), reverse=True) if root.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"no train.py checkpoint at {path}: expected a run directory, its checkpoints/ or a step directory")
    return [root / str(s) for s in steps]


def step_dir(path: str | pathlib.Path) -> pathlib.Path:
    """A checkpoint step directory from a run's output dir, its checkpoints/ dir (latest step) or a step dir."""
    return _step_dirs(path)[0]


def read_config(path: str | pathlib.Path) -> TrainConfig:
    """The TrainConfig a checkpoint was written with; of a run, that of its newest checkpoint whose
    config reads (a damaged one is reported and skipped, as `restore` skips damaged arrays)."""
    problems = []
    for directory in _step_dirs(path):
        try:
            return from_json(ocp.JsonCheckpointHandler().restore(directory / "config"))
        except Exception as err:  # noqa: BLE001 - a damaged JSON file or a config that no longer validates
            problems.append(f"{directory / 'config'}: {type(err).__name__}: {str(err)[:300]}")
            log.warning("checkpoint config unreadable: %s", problems[-1])
    raise CorruptCheckpoint(f"no readable checkpoint config: {'; '.join(problems)}")


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


def exported(path: str | pathlib.Path) -> dict | None:
    """The `export` item ({source, params}) of a policy-only checkpoint; None for a trainer checkpoint."""
    directory = step_dir(path)
    return ocp.JsonCheckpointHandler().restore(directory / "export") if (directory / "export").is_dir() else None


def load_trained(path: str | pathlib.Path, params: str = "ema") -> tuple[Pi05, TrainConfig]:
    """(model, run config) of a train.py checkpoint on one device; `params`: "ema" (default, the
    EMA weights as openpi evaluates; falls back to the raw params when the run kept no EMA) or "params".
    A policy-only export holds one set of weights: asking for the other is an error."""
    if params not in ("ema", "params"):
        raise ValueError(f"params: expected 'ema' or 'params', got {params!r}")
    directory = step_dir(path)
    export = exported(directory)
    if export is not None and export["params"] != params:
        raise ValueError(f"{directory}: a policy-only export of {export['source']} that holds its {export['params']} "
                         f"weights only, not its {params}")
    cfg = read_config(directory)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    on_device = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)  # noqa: E731
    template = on_device(abstract_model(cfg.model))
    with ocp.StandardCheckpointer() as ckptr:
        model = _read(ckptr, directory, "params", template)
        if params == "ema" and (directory / "ema").is_dir():
            trainable, frozen = eqx.partition(model, trainable_filter(model))
            model = eqx.combine(_read(ckptr, directory, "ema", on_device(trainable)), frozen)
    return model, cfg


def _read(ckptr: ocp.StandardCheckpointer, directory: pathlib.Path, name: str, template):
    """Item `name` of step dir `directory`, verified against its checksums."""
    try:
        tree = ckptr.restore(directory / name, template)
    except Exception as err:  # noqa: BLE001 - orbax/tensorstore raise many types for a damaged file
        raise CorruptCheckpoint(f"checkpoint {directory}: {name} cannot be read ({type(err).__name__}: {str(err)[:300]})") from None
    verify(directory, name, tree)
    return tree


EXPORT_FILE_BYTES = 4 * 2**20  # an export's weights files stay near this size, so it commits to git without large files


def export_policy(src: str | pathlib.Path, dst: str | pathlib.Path, params: str = "ema",
                  file_bytes: int = EXPORT_FILE_BYTES) -> pathlib.Path:
    """Write the policy of train.py checkpoint `src` (a run dir, its checkpoints/ or a step dir) to the
    new directory `dst`: dst/<step>/ with `params` (the `params` weights: "ema" combined with the frozen
    leaves, or the raw params), config, assets, checksums and `export`. `evaluate.py --checkpoint dst`
    and `serve` read it like the run; what only resuming training needs (optimizer state, data
    iterator, the other weights) is left out. The weights are written in data files of about `file_bytes`
    each (tensorstore OCDBT's target size). Returns the step dir written. Refuses an existing `dst`."""
    dst = pathlib.Path(dst).absolute()
    if dst.exists():
        raise FileExistsError(f"{dst} exists: an export writes a new directory (remove it or choose another)")
    directory = step_dir(src)
    if not (directory / "assets").is_dir():
        raise FileNotFoundError(f"{directory}: no 'assets' item (norm stats + tokenizer): a policy without them "
                                "cannot be evaluated from the export alone")
    if params == "ema" and not (directory / "ema").is_dir():
        raise FileNotFoundError(f"{directory}: the run kept no EMA (ema_decay=None); export with params='params'")
    model, _ = load_trained(directory, params)  # verified against the source's checksums
    out = dst / directory.name
    out.mkdir(parents=True)
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(out / "params", args=ocp.args.PyTreeSave(model, ocdbt_target_data_file_size=file_bytes))
    for item in ("config", "assets"):
        shutil.copytree(directory / item, out / item)
    for item, value in (("checksums", {"params": checksums(model)[0]}), ("export", {"source": str(directory), "params": params})):
        (out / item).mkdir()
        ocp.JsonCheckpointHandler().save(out / item, args=ocp.args.JsonSave(value))
    return out


if __name__ == "__main__":  # python -m eqx_pi05.checkpoints --src RUN_DIR --dst EXPORT_DIR [--params ema]
    import tyro

    print(f"wrote {tyro.cli(export_policy)}")
