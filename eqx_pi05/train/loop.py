"""The training loop: build or restore the state, then step, log, check, save."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import pathlib
import secrets
import shutil
import time

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from eqx_pi05 import cameras, checkpoints, lock
from eqx_pi05.data.pipeline import make_data_loader
from eqx_pi05.model import Pi05
from eqx_pi05.prompt import prompt_length, trim_prompt
from eqx_pi05.variants import TrainConfig, to_json
from eqx_pi05.train.metrics import MetricsLog
from eqx_pi05.train.optimizer import make_optimizer
from eqx_pi05.train.sharding import fsdp_shardings, global_batch, initialize, make_mesh, state_shardings
from eqx_pi05.train.state import TrainState, init_state
from eqx_pi05.train.step import FAST_COMPILE, StepConfig, drops_student, jit_train_step
from eqx_pi05.trainable import describe_counts, param_counts

logger = logging.getLogger(__name__)  # the phase lines (train.py shows INFO; `log` below is the metrics log)


def ensure_demo_dataset(directory: pathlib.Path) -> pathlib.Path:
    """Write the synthetic demo dataset (eqx_pi05.data.make_demo_dataset) unless it is there; built
    beside the target and renamed into place, so concurrent processes never see half of one."""
    directory = pathlib.Path(directory)
    if not (directory / "norm_stats.json").exists():
        from eqx_pi05.data.make_demo_dataset import make_demo_dataset  # noqa: PLC0415

        tmp = directory.with_name(f"{directory.name}.tmp{os.getpid()}")
        make_demo_dataset(tmp)
        try:
            tmp.rename(directory)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def initial_state(cfg: TrainConfig, mesh: Mesh) -> TrainState:
    """The state at step 0, FSDP-laid-out on `mesh`: params from an openpi params checkpoint (LoRA
    adapters it lacks initialised), or a random init computed directly into its shards."""
    if cfg.weights is None:
        logger.info("initialising the model at random")
        state = _init(None, **_init_config(cfg, mesh))
    else:
        logger.info("loading the weights %s", cfg.weights)
        weights = checkpoints.load_weights(cfg.weights, cfg.model, lora_seed=cfg.seed if cfg.is_lora else None)
        state = _init(weights, **_init_config(cfg, mesh))
    if cfg.ema_memory == "host":  # the EMA moves to pinned host memory (the rest stays where it is)
        state = jax.device_put(state, state_shardings(state, mesh, cfg.fsdp_min_bytes, cfg.ema_memory))
    return state


def state_shapes(cfg: TrainConfig, mesh: Mesh) -> TrainState:
    """The shapes and dtypes of `initial_state` (abstract: no memory, no compile)."""
    return _init.eval_shape(None, **_init_config(cfg, mesh))


def _init_config(cfg: TrainConfig, mesh: Mesh) -> dict:
    return dict(model=cfg.model, lr=cfg.lr, optimizer=cfg.optimizer, ema=cfg.ema_decay is not None, seed=cfg.seed,
                mesh=mesh, min_bytes=cfg.fsdp_min_bytes)


# The init runs once per run, so it is compiled for compile time, not speed; equal static arguments
# (and weights of equal shapes) share one compilation through jax.jit's own cache.
@functools.partial(jax.jit, static_argnames=("model", "lr", "optimizer", "ema", "seed", "mesh", "min_bytes"),
                   compiler_options=FAST_COMPILE)
def _init(weights, *, model, lr, optimizer, ema, seed, mesh, min_bytes):
    """The state from `weights`, or from a random init (`seed`) when None, laid out by the FSDP rule."""
    if weights is None:
        weights = Pi05(model, key=jax.random.key(seed))
    state = init_state(weights, make_optimizer(lr, optimizer), ema=ema, seed=seed)
    return jax.lax.with_sharding_constraint(state, fsdp_shardings(state, mesh, min_bytes))


def load_teacher(cfg: TrainConfig) -> Pi05 | None:
    """Mode `checkpoint`: a train.py checkpoint (its EMA params) or an openpi params dir (read with the
    student's model config), cast to its compute dtype; it never trains."""
    d = cfg.distill
    if d is None or d.teacher != "checkpoint":
        return None
    try:
        teacher, _ = checkpoints.load_trained(d.teacher_checkpoint)
    except FileNotFoundError:
        teacher = checkpoints.load_weights(d.teacher_checkpoint, cfg.model)
    return jax.tree.map(lambda x: x.astype(teacher.config.dtype), teacher)


def _check_inputs(cfg: TrainConfig, devices: int) -> None:
    for name in ("dataset", "tokenizer", "norm_stats"):
        if not pathlib.Path(getattr(cfg.data, name)).exists():
            raise FileNotFoundError(f"data.{name}: {getattr(cfg.data, name)} does not exist (see --data.{name.replace('_', '-')}, or --preset demo)")
    if cfg.data.batch_size % (devices * cfg.grad_accum_steps):
        raise ValueError(f"data.batch_size={cfg.data.batch_size} is not divisible by the {devices} devices of the mesh "
                         f"times grad_accum_steps={cfg.grad_accum_steps} (each device's rows split into equal micro-batches)")


def _existing_steps(cfg: TrainConfig) -> list[int]:
    root = cfg.run_dir / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []


def _check_run_dir(cfg: TrainConfig) -> None:
    """--resume needs a checkpoint; without it, an existing run is never silently restarted."""
    steps = _existing_steps(cfg)
    if cfg.resume and not steps:
        raise FileNotFoundError(f"--resume: no checkpoint in {cfg.run_dir / 'checkpoints'} to resume from "
                                "(drop --resume to start a new run there)")
    if steps and not cfg.resume and not cfg.overwrite:
        raise FileExistsError(f"{cfg.run_dir} holds checkpoints (latest step {steps[-1]}): pass --resume to continue, "
                              "--overwrite to start over, or another --output-dir")


def _start(cfg: TrainConfig, mesh: Mesh, shapes, data_iter):
    """Everything that reads before the run writes: the state (restored from the newest intact
    checkpoint, or initial: weights loaded and shape-checked) and the teacher. Returns
    (state, corrupt checkpoint steps to set aside, teacher)."""
    if cfg.resume:
        check_resume_config(checkpoints.read_config(cfg.run_dir / "checkpoints"), cfg)
        shardings = state_shardings(shapes, mesh, cfg.fsdp_min_bytes, cfg.ema_memory)
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
        state, mgr, corrupt = checkpoints.restore(cfg.run_dir / "checkpoints", target, data_iter, cfg.keep_checkpoints, cfg.async_checkpoint)
        mgr.close()
        if corrupt:
            logger.warning("checkpoint step(s) %s are corrupt (set aside as corrupt-<step>)", corrupt)
        logger.info("resuming from checkpoint %d in %s", int(state.step), cfg.run_dir / "checkpoints")
    else:
        state, corrupt = initial_state(cfg, mesh), []
    teacher = load_teacher(cfg)
    if teacher is not None:
        teacher = jax.device_put(teacher, fsdp_shardings(teacher, mesh, cfg.fsdp_min_bytes))
    return state, corrupt, teacher


def _prepare_run_dir(cfg: TrainConfig, corrupt: list[int], main: bool, run_info: dict) -> None:
    """The first writes into the output directory, after start-up passed: corrupt checkpoints set
    aside (renamed, never deleted), --overwrite's old run removed, config.json written."""
    out = cfg.run_dir
    if main:
        checkpoints.set_aside(out / "checkpoints", corrupt)
        if cfg.overwrite and not cfg.resume:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "config.json").write_text(json.dumps(run_info, indent=1))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices("run dir prepared")


def train(cfg: TrainConfig) -> list[dict]:
    """Run (or resume) `cfg`; returns the logged metrics records (also in OUTPUT_DIR/metrics.jsonl).
    The whole start-up (config, dataset, norm stats, tokenizer, checkpoint or weights, teacher) runs
    before anything in the output directory changes, under the directory's lock (one writer)."""
    initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
    mesh, main = make_mesh(cfg.fsdp_devices), jax.process_index() == 0
    _check_inputs(cfg, mesh.size)
    _check_run_dir(cfg)
    with lock.hold(cfg.run_dir, f"train.py {cfg.name}") if main else contextlib.nullcontext():
        logger.info("loading the dataset %s", cfg.data.dataset)
        data_iter = iter(make_data_loader(cfg.data))
        assets = checkpoints.policy_assets(cfg)  # the stats and tokenizer this run trains with, in every checkpoint
        shapes = state_shapes(cfg, mesh)
        state, corrupt, teacher = _start(cfg, mesh, shapes, data_iter)
        # What trains, per part (abstract shapes: no memory); config.json and W&B keep it beside the config.
        run_info = {**to_json(cfg), "param_counts": param_counts(shapes.model())}
        if main:
            logger.info("%s: %s", cfg.name, describe_counts(run_info["param_counts"]))
        _prepare_run_dir(cfg, corrupt, main, run_info)
        return _loop(cfg, mesh, state, teacher, data_iter, run_info, assets)


def _loop(cfg: TrainConfig, mesh: Mesh, state: TrainState, teacher, data_iter, run_info: dict, assets: dict) -> list[dict]:
    out, main = cfg.run_dir, jax.process_index() == 0
    mgr = checkpoints.manager(out / "checkpoints", cfg.keep_checkpoints, cfg.async_checkpoint)
    # Slots no row may attend to, decided from the config (not per batch: a chance all-False batch
    # would retrace, and processes must agree): the padding slot and cameras view_remove always drops.
    always_removed = [cameras.PADDING_SLOT, *cfg.data.view_remove.train.always()]
    start, n, step_cfg = int(state.step), cfg.num_train_steps, StepConfig.of(cfg)
    suffix = "" if main else f".process{jax.process_index()}"
    log = MetricsLog(out / f"metrics{suffix}.jsonl", start=start, wandb_run=_wandb_run(cfg, run_info, fresh=start == 0) if cfg.wandb and main else None)
    records, pending, t0 = [], [], time.perf_counter()
    compiled = set()  # (camera set, batch shapes) of the step programs built so far
    logger.info("training %s, steps %d to %d, into %s", cfg.name, start, n, out)
    bar = tqdm(range(start, n), initial=start, total=n, disable=not main, desc=cfg.name, unit="step")
    for step in bar:
        try:
            batch = next(data_iter)
        except StopIteration:  # a finite dataset (data.num_epochs) ran out: end here, keeping every step
            bar.close()
            logger.warning("the data ran out after data.num_epochs=%s epoch(s) at step %d of num_train_steps=%d; "
                           "saving step %d and stopping", cfg.data.num_epochs, step, n, step)
            n = step
            break
        missing = set(always_removed) - set(cameras.removable(batch["image_mask"]))
        if missing:
            raise ValueError(f"step {step}: slots {sorted(missing)} should be masked in every row by the config, but are not")
        p = 0.0 if cfg.distill is None else cfg.distill.p_at(step, cfg.num_train_steps)
        batch = trim_prompt(cameras.drop(batch, always_removed), length=_global_prompt_length(batch))
        batch = global_batch(batch, mesh)
        wrist_only = drops_student(step_cfg, p)
        program = (wrist_only, tuple((jax.tree_util.keystr(k), x.shape) for k, x in jax.tree_util.tree_leaves_with_path(batch)))
        if program not in compiled:  # the call compiles before it dispatches: minutes on a CPU, so say so
            logger.info("compiling the training step (once per camera set / prompt bucket)...")
            compile_start = time.perf_counter()
        state, metrics = jit_train_step(state, batch, np.float32(p), teacher, wrist_only, cfg=step_cfg, mesh=mesh,
                                        min_bytes=cfg.fsdp_min_bytes)
        if program not in compiled:
            compiled.add(program)
            logger.info("compiled in %.0f s", time.perf_counter() - compile_start)
        pending.append(metrics)
        done = step + 1
        if done % cfg.log_interval and done % cfg.save_interval and done != n:
            continue
        records.append(_log(cfg, log, mgr, pending, done, t0, bar))
        pending, t0 = [], time.perf_counter()
        if done % cfg.save_interval == 0 or done == n:
            logger.info("saving checkpoint %d in %s", done, mgr.directory)
            checkpoints.save(mgr, state, data_iter, cfg, assets)
    if pending:  # steps since the last log, when the data ran out
        records.append(_log(cfg, log, mgr, pending, n, t0, bar))
    if int(state.step) > start and mgr.latest_step() != int(state.step):
        checkpoints.save(mgr, state, data_iter, cfg, assets)
    mgr.wait_until_finished()
    mgr.close()
    log.close()
    return records


def _log(cfg: TrainConfig, log: MetricsLog, mgr, pending: list, done: int, t0: float, bar) -> dict:
    """One metrics record for the steps `pending` (ending at step `done` - 1)."""
    try:  # the only host sync, and a NaN check of every step since the last one
        record = _summary(jax.device_get(pending), done - len(pending), time.perf_counter() - t0, cfg.data.batch_size)
    except FloatingPointError as e:
        raise FloatingPointError(f"{e}: stopped; {checkpoints.last_good(mgr)}") from None
    log.write(done - 1, record)
    bar.set_postfix(loss=f"{record['loss']:.4f}", p=f"{record['p']:.2f}")
    return {"step": done - 1, **record}


def _global_prompt_length(batch: dict) -> int:
    """The longest valid prompt over every process's rows: all processes cut their rows to one width
    (a small all-gather per step on a multi-host run; none on one host)."""
    length = prompt_length(batch["tokenized_prompt_mask"])
    if jax.process_count() == 1:
        return length
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return int(np.max(multihost_utils.process_allgather(np.int32(length))))


# Fields a resumed run may change: how it runs, not what it trains (num_train_steps extends a run;
# note it also stretches a curriculum), and files read again (a moved dataset; changed stats are the user's call).
RESUMABLE = ("output_dir", "resume", "overwrite", "ema_memory", "log_interval", "save_interval", "keep_checkpoints", "async_checkpoint",
             "xla_fast_compile", "grad_accum_steps", "fsdp_devices", "fsdp_min_bytes", "wandb", "wandb_project", "wandb_offline",
             "coordinator_address", "num_processes", "process_id", "num_train_steps", "weights",
             "data.dataset", "data.tokenizer", "data.norm_stats", "distill.teacher_checkpoint")


def check_resume_config(saved: TrainConfig, cfg: TrainConfig) -> None:
    """--resume continues the run the checkpoint holds: any other difference (model, data transforms,
    camera removal, optimizer, schedule, distillation, seeds) is an error naming the fields."""
    def flat(tree, prefix=""):
        if isinstance(tree, dict):
            return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
        return {prefix[:-1]: tree}

    old, new = flat(to_json(saved)), flat(to_json(cfg))
    changed = sorted(k for k in old.keys() | new.keys()
                     if old.get(k) != new.get(k) and not any(k == r or k.startswith(r + ".") for r in RESUMABLE))
    if changed:
        diff = "; ".join(f"{k}: checkpoint {old.get(k)!r}, now {new.get(k)!r}" for k in changed)
        raise ValueError(f"--resume with a config that differs from the checkpoint's in {diff}. Resume with the run's "
                         "settings (its config.json), or start a new run (--output-dir, or --overwrite)")


def _summary(values: list[dict], first_step: int, seconds: float, batch_size: int) -> dict[str, float]:
    """Each metric's mean over the steps since the last log (p and lr: the last step's), and samples/s;
    a non-finite loss raises, naming its step."""
    for i, m in enumerate(values):
        if not np.isfinite(m["loss"]):
            raise FloatingPointError(f"loss is {m['loss']} at step {first_step + i}")
    record = {k: float(np.mean([m[k] for m in values])) for k in values[-1]}
    return {**record, "p": float(values[-1]["p"]), "lr": float(values[-1]["lr"]), "samples_per_s": len(values) * batch_size / seconds}


def _wandb_run(cfg: TrainConfig, config: dict, fresh: bool) -> dict:
    """wandb.init's arguments (`config`: what config.json holds). The run id is kept in OUTPUT_DIR/wandb_run_id, so a resumed run logs
    on into the same W&B run; a run started over gets a new id."""
    id_file = cfg.run_dir / "wandb_run_id"
    if fresh or not id_file.exists():
        id_file.write_text(secrets.token_hex(4))
    return dict(project=cfg.wandb_project, name=cfg.name, config=config, dir=str(cfg.run_dir),
                mode="offline" if cfg.wandb_offline else "online", id=id_file.read_text().strip(), resume="allow")
