"""Training configs: every knob of the research report is a field, every experiment a named instance.

`python train.py --variant NAME` picks one of `VARIANTS`; tyro turns the instance into flags, so any
field can be overridden (`--distill.lam 0.5`, `--data.batch-size 64`). A combination that makes no
sense raises at construction with a message naming the fields. Research knobs of the distillation
(λ, anchor_frac, schedule, teacher) have no defaults: a distillation config that leaves one out fails.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import types
import typing
from typing import Literal

from eqx_pi05.config import (
    GEMMA_2B_LORA,
    GemmaConfig,
    SiglipConfig,
    GEMMA_300M_LORA,
    GEMMA_DUMMY,
    GEMMA_DUMMY_LORA,
    SIGLIP_TINY,
    Pi05Config,
    pi05_full,
    pi05_tiny,
)
from eqx_pi05.data.data_config import DataConfig
from eqx_pi05.cameras import CameraProbs, ViewDropoutConfig, ViewRemoveConfig
from eqx_pi05.loss import DistillConfig

def _check_ranges(prefix: str, cfg, **bounds: tuple) -> None:
    """bounds: field=(low, low allowed) or (low, low allowed, high exclusive); NaN fails every test."""
    for name, (low, inclusive, *high) in bounds.items():
        v = getattr(cfg, name)
        ok = (v >= low if inclusive else v > low) and (not high or v < high[0]) and math.isfinite(v)
        if not ok:
            want = f"{'>=' if inclusive else '>'} {low}" + (f" and < {high[0]}" if high else "")
            raise ValueError(f"{prefix}.{name}={v}: expected a finite number {want}")


def _check_finite(cfg, prefix: str = "") -> None:
    """Every float field of a (nested) config is finite: NaN or inf names its field."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{prefix}{f.name}={v}: expected a finite number")
        if dataclasses.is_dataclass(v):
            _check_finite(v, f"{prefix}{f.name}.")


@dataclasses.dataclass(frozen=True)
class LRSchedule:
    """openpi's CosineDecaySchedule: linear warm-up from peak/(warmup+1) to peak over warmup_steps,
    then cosine decay to decay_lr at decay_steps (pi05_libero: peak == decay, i.e. constant)."""

    warmup_steps: int
    peak_lr: float
    decay_steps: int
    decay_lr: float

    def __post_init__(self):
        _check_ranges("lr", self, peak_lr=(0, False), decay_lr=(0, True), warmup_steps=(0, True))
        if self.decay_steps <= self.warmup_steps:
            raise ValueError(f"lr.decay_steps={self.decay_steps}: expected more than lr.warmup_steps={self.warmup_steps}")


@dataclasses.dataclass(frozen=True)
class AdamW:
    """openpi's AdamW: global-norm clipping, then AdamW with weight decay on every param."""

    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 1e-10
    clip_gradient_norm: float = 1.0
    # Adam's first moment stored in this dtype ("bfloat16": 6.2 GiB less at full size); None: float32
    # as openpi. The second moment and the EMA stay float32.
    mu_dtype: str | None = None

    def __post_init__(self):
        _check_ranges("optimizer", self, b1=(0, True, 1), b2=(0, True, 1), eps=(0, False), weight_decay=(0, True),
                      clip_gradient_norm=(0, False))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    name: str
    model: Pi05Config
    data: DataConfig
    lr: LRSchedule
    ema_decay: float | None  # EMA of the params kept in the train state; None: none (openpi's LoRA configs)
    num_train_steps: int
    optimizer: AdamW = AdamW()
    # Where the EMA lives: "device" (openpi), or "host": pinned host memory (JAX memory kinds), updated
    # leaf by leaf after each step, so the step never holds it on the device (12.5 GiB less at full size).
    ema_memory: Literal["device", "host"] = "device"
    distill: DistillConfig | None = None  # in-loss camera removal and distillation (B3-B5)
    seed: int = 42  # model init and the per-step RNG (data shuffling: data.seed)
    # openpi params checkpoint to start from: a directory or a URL orbax reads (gs://...); None: random init.
    # A string, not a Path: a Path would fold gs:// into gs:/.
    weights: str | None = None
    augment: bool = True  # openpi's train-time image augmentation (eqx_pi05.augment)
    # openpi's colour jitter lifts an all-black frame (view_dropout's zeros) to a uniform grey in ~24 % of
    # samples, so a zeroed camera is not constant during training; False keeps all-black frames black.
    augment_black_frames: bool = True
    output_dir: pathlib.Path | None = None  # checkpoints/, metrics.jsonl, config.json; default outputs/<name>
    resume: bool = False  # continue from the latest checkpoint in output_dir
    overwrite: bool = False  # without --resume: start over, replacing output_dir's run (once start-up passed)
    log_interval: int = 100  # steps between metrics lines (and NaN checks)
    save_interval: int = 1000  # steps between checkpoints (the last step is always saved)
    keep_checkpoints: int = 2  # checkpoints kept, newest first (2: a corrupt latest one has one to fall back to)
    async_checkpoint: bool = True  # write checkpoints in the background
    xla_fast_compile: bool = False  # XLA backend optimisations off: ~2x faster compiles, ~2x slower steps (tests)
    # The batch's gradient as the mean of this many micro-batches of batch_size / K rows, one optimizer
    # step: the memory of a micro-batch (openpi's batch 256 on one GPU: 32 x 8); equal up to summation order.
    grad_accum_steps: int = 1
    fsdp_devices: int = 1  # mesh ("data", "fsdp"): params, EMA and optimizer state sharded over fsdp
    fsdp_min_bytes: int = 4 * 2**20  # arrays smaller than this stay replicated (openpi: 4 MiB)
    wandb: bool = False  # also log to Weights & Biases (pip install wandb)
    wandb_project: str = "eqx-pi05"  # W&B project
    wandb_offline: bool = False  # W&B offline mode: write locally, sync later, no network
    coordinator_address: str | None = None  # multi-host: jax.distributed coordinator host:port
    num_processes: int = 1  # multi-host: number of processes
    process_id: int = 0  # multi-host: this process

    def __post_init__(self):
        _check_finite(self)
        d = self.distill
        if d is not None:
            for mech, probs in (("view_dropout", self.data.view_dropout.train), ("view_remove", self.data.view_remove.train)):
                if getattr(probs, d.camera) > 0:
                    raise ValueError(
                        f"data.{mech}.train.{d.camera}={getattr(probs, d.camera)} with distill.camera={d.camera!r}: the "
                        "distillation removes the student's camera in the loss and needs it intact in the batch "
                        f"(the teacher sees it); set data.{mech}.train.{d.camera}=0"
                    )
            if d.teacher == "ema" and self.ema_decay is None:
                raise ValueError("distill.teacher='ema' with ema_decay=None: the EMA teacher needs an EMA; set ema_decay")
            if d.teacher == "ema" and self.ema_memory == "host":
                raise ValueError("distill.teacher='ema' with ema_memory='host': the EMA teacher is read by every step, so "
                                 "it would be copied to the device anyway; use ema_memory='device'")
        if self.ema_memory == "host" and self.ema_decay is None:
            raise ValueError("ema_memory='host' with ema_decay=None: this run keeps no EMA; drop ema_memory or set ema_decay")
        if not self.augment_black_frames and not self.augment:
            raise ValueError("augment_black_frames=False with augment=False: there is no augmentation to keep black "
                             "frames out of; drop --no-augment-black-frames or turn augment on")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay: expected None or a value in [0, 1), got {self.ema_decay}")
        for a, b in (("max_token_len", "max_token_len"), ("action_horizon", "action_horizon")):
            if getattr(self.data, a) != getattr(self.model, b):
                raise ValueError(f"data.{a}={getattr(self.data, a)} differs from model.{b}={getattr(self.model, b)}")
        for name in ("num_train_steps", "log_interval", "save_interval", "keep_checkpoints", "fsdp_devices", "num_processes", "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"process_id {self.process_id}: expected 0 <= process_id < num_processes={self.num_processes}")

    @property
    def run_dir(self) -> pathlib.Path:
        return self.output_dir if self.output_dir is not None else pathlib.Path("outputs") / self.name

    @property
    def is_lora(self) -> bool:
        return self.model.paligemma.lora is not None or self.model.action_expert.lora is not None


# ---------------------------------------------------------------------------------------------------
# The variants (research report §04 and the results table). pi05_libero is openpi's recipe with the
# report's single-GPU batch of 32; everything else is a change of one block.

LIBERO_DATA = DataConfig(
    dataset=pathlib.Path("data/physical-intelligence/libero"),
    tokenizer=pathlib.Path("assets/paligemma_tokenizer.model"),
    norm_stats=pathlib.Path("assets/pi05_libero/norm_stats.json"),
    action_horizon=10,
    max_token_len=200,
    batch_size=32,
    seed=42,
)
AGENTVIEW = CameraProbs(agentview=1.0)
EVAL_WRIST_ONLY = ViewRemoveConfig(seed=42, eval=AGENTVIEW)  # students of B3-B5 are served wrist-only

PI05_LIBERO = TrainConfig(
    name="pi05_libero",
    model=pi05_full(action_horizon=10),
    data=LIBERO_DATA,
    lr=LRSchedule(warmup_steps=10_000, peak_lr=5e-5, decay_steps=1_000_000, decay_lr=5e-5),
    ema_decay=0.999,
    num_train_steps=30_000,
    weights="checkpoints/pi05_base/params",
)


def _variant(name: str, **changes) -> TrainConfig:
    return dataclasses.replace(PI05_LIBERO, name=name, **changes)


# The report's runs train on "LeRobot LIBERO libero_spatial" (its Fig. 1) and evaluate on LIBERO-Spatial;
# openpi's pi05_libero on all four suites of physical-intelligence/libero. Norm stats on the selection:
#   python -m eqx_pi05.data.norm_stats data/physical-intelligence/libero --suites libero_spatial \
#       --output assets/pi05_libero_spatial/norm_stats.json
LIBERO_SPATIAL = dict(suites=("libero_spatial",), norm_stats=pathlib.Path("assets/pi05_libero_spatial/norm_stats.json"))


def _data(**changes) -> DataConfig:
    """The report's data: LIBERO_DATA restricted to libero_spatial, with `changes`."""
    return dataclasses.replace(LIBERO_DATA, **{**LIBERO_SPATIAL, **changes})


# Two readings of the report's LoRA rows ("~1.5 % trainable params, frozen backbone"), two experiments:
# openpi's freeze filter (Gemma weights frozen; SigLIP, projections, time MLP train: 13.7 % trainable)
# and the frozen backbone (the vision tower frozen too: adapters + action heads, 1.53 % trainable).
_LORA_MODEL = pi05_full(action_horizon=10, paligemma=GEMMA_2B_LORA, action_expert=GEMMA_300M_LORA)
_LORA_FROZEN_VISION_MODEL = dataclasses.replace(_LORA_MODEL, freeze_vision=True)
ZERO_P05 = ViewDropoutConfig(seed=42, train=CameraProbs(agentview=0.5))
ZERO_P1 = ViewDropoutConfig(seed=42, train=AGENTVIEW)

# (config, the one line `python train.py --help` shows for it)
_TABLE: tuple[tuple[TrainConfig, str], ...] = (
    (PI05_LIBERO, "both cameras: openpi's recipe, full fine-tune from pi05_base (the reference row)"),
    (_variant("wristonly_zero", data=_data(view_dropout=ViewDropoutConfig(seed=42, train=AGENTVIEW))),
     "B1: agentview pixels zeroed, its mask kept True (train only)"),
    (_variant("wristonly_physdrop", data=_data(view_remove=ViewRemoveConfig(seed=42, train=AGENTVIEW, eval=AGENTVIEW))),
     "B2: agentview removed (mask False, its tokens leave the sequence) at train and eval"),
    (_variant("curriculum_only", data=_data(view_remove=EVAL_WRIST_ONLY),
              distill=DistillConfig(lam=0.0, anchor_frac=0.0, schedule="curriculum", curriculum_frac=0.75)),
     "B3: agentview removed in the loss with the curriculum p(step), no teacher terms"),
    (_variant("selfdistill_only", data=_data(view_remove=EVAL_WRIST_ONLY),
              distill=DistillConfig(lam=1.0, anchor_frac=0.15, schedule="constant", p=1.0, teacher="self")),
     "B4: student always wrist-only, distilled from the live both-camera model (lam 1, anchor 0.15)"),
    (_variant("curric_selfdistill", data=_data(view_remove=EVAL_WRIST_ONLY),
              distill=DistillConfig(lam=1.0, anchor_frac=0.15, schedule="curriculum", curriculum_frac=0.75, teacher="self")),
     "B5, the report's method: curriculum removal + self-distillation"),
    # LoRA reference rows (issue #5): both experts LoRA, EMA off (openpi's LoRA configs), openpi's
    # freeze filter (lora_*) or the frozen backbone (lora_frozenvision_*).
    (_variant("lora_wristonly_zero_p05", model=_LORA_MODEL, ema_decay=None, data=_data(view_dropout=ZERO_P05)),
     "LoRA row, openpi's freeze filter (13.7 % trainable): EMA off, agentview zeroed with p=0.5"),
    (_variant("lora_wristonly_zero_p1", model=_LORA_MODEL, ema_decay=None, data=_data(view_dropout=ZERO_P1)),
     "LoRA row, openpi's freeze filter (13.7 % trainable): EMA off, agentview zeroed with p=1"),
    (_variant("lora_frozenvision_wristonly_zero_p05", model=_LORA_FROZEN_VISION_MODEL, ema_decay=None,
              data=_data(view_dropout=ZERO_P05)),
     "LoRA row, frozen backbone incl. vision (1.53 % trainable, the report's): agentview zeroed with p=0.5"),
    (_variant("lora_frozenvision_wristonly_zero_p1", model=_LORA_FROZEN_VISION_MODEL, ema_decay=None,
              data=_data(view_dropout=ZERO_P1)),
     "LoRA row, frozen backbone incl. vision (1.53 % trainable, the report's): agentview zeroed with p=1"),
)
VARIANTS: dict[str, TrainConfig] = {c.name: c for c, _ in _TABLE}
SUMMARIES: dict[str, str] = {c.name: line for c, line in _TABLE}


# ---------------------------------------------------------------------------------------------------
# --preset demo: the same variant on the tiny model and the synthetic demo dataset, CPU-sized.

# The tiny model with 56-pixel patches: 16 tokens per camera instead of 256 (a ~30x cheaper CPU step).
DEMO_SIGLIP = dataclasses.replace(SIGLIP_TINY, patch_size=56)


def demo_model(model: Pi05Config) -> Pi05Config:
    """The tiny model with the LoRA layout and freeze choice of `model` (each expert LoRA iff it is in `model`)."""
    pick = lambda g: GEMMA_DUMMY_LORA if g.lora else GEMMA_DUMMY  # noqa: E731
    return pi05_tiny(paligemma=pick(model.paligemma), action_expert=pick(model.action_expert), siglip=DEMO_SIGLIP,
                     action_horizon=model.action_horizon, freeze_vision=model.freeze_vision)


def local_dataset(data: DataConfig, data_dir: pathlib.Path, model: Pi05Config, **changes) -> DataConfig:
    """`data` read from `data_dir` with the tokenizer.model and norm_stats.json beside it, sized for `model`."""
    return dataclasses.replace(data, dataset=data_dir, tokenizer=data_dir / "tokenizer.model",
                               norm_stats=data_dir / "norm_stats.json", max_token_len=model.max_token_len, **changes)


def demo(cfg: TrainConfig, data_dir: pathlib.Path) -> TrainConfig:
    """`cfg` on the tiny model (random init) and the demo dataset in `data_dir`, sized to train in a
    minute or two on a laptop CPU: batch 8, 100 steps, a short warm-up to a higher peak LR, EMA 0.95
    (0.999 would average over ten times the run). A rerun into the same directory needs --resume or
    --overwrite: a finished run is never replaced by default."""
    model = demo_model(cfg.model)
    data = local_dataset(cfg.data, data_dir, model, batch_size=8, num_workers=0)
    return dataclasses.replace(
        cfg,
        model=model,
        data=data,
        lr=LRSchedule(warmup_steps=10, peak_lr=1e-3, decay_steps=100, decay_lr=1e-4),
        ema_decay=None if cfg.ema_decay is None else 0.95,
        num_train_steps=100,
        weights=None,
        output_dir=pathlib.Path("outputs") / f"{cfg.name}_demo",
        log_interval=10,
        save_interval=50,
    )


# ---------------------------------------------------------------------------------------------------
# --preset closed_loop: a from-scratch policy sized to learn LIBERO-Spatial tasks on a CPU in about an
# hour, on demonstrations recorded by `python -m eqx_pi05.eval.record` (experiments/closed_loop/).

CLOSED_LOOP_DATA = pathlib.Path("data/closed_loop")
# 28-pixel patches: 64 tokens per camera (the demo's 16 lose the bowl's rim in the wrist view).
CLOSED_LOOP_SIGLIP = SiglipConfig(width=64, depth=2, mlp_dim=128, num_heads=2, patch_size=28)
CLOSED_LOOP_GEMMA = GemmaConfig(width=128, depth=4, mlp_dim=256, num_heads=4, num_kv_heads=1, head_dim=32)


def closed_loop(cfg: TrainConfig, data_dir: pathlib.Path = CLOSED_LOOP_DATA) -> TrainConfig:
    """`cfg` on a small from-scratch model and a recorded LIBERO dataset in `data_dir` (its
    tokenizer.model and norm_stats.json beside it). The state goes into the prompt as pi0.5's
    discrete state tokens: a policy without it cannot tell how high the bowl already is."""
    model = pi05_tiny(paligemma=CLOSED_LOOP_GEMMA, action_expert=CLOSED_LOOP_GEMMA, siglip=CLOSED_LOOP_SIGLIP,
                      max_token_len=96, action_horizon=cfg.model.action_horizon)
    data = local_dataset(
        cfg.data,
        data_dir,
        model,
        discrete_state_input=True,
        batch_size=32,
        num_workers=2,
    )
    steps = 3000
    return dataclasses.replace(
        cfg,
        model=model,
        data=data,
        lr=LRSchedule(warmup_steps=100, peak_lr=1e-3, decay_steps=steps, decay_lr=5e-5),
        ema_decay=None if cfg.ema_decay is None else 0.99,
        num_train_steps=steps,
        weights=None,
        output_dir=pathlib.Path("outputs") / f"{cfg.name}_closed_loop",
        log_interval=50,
        save_interval=250,
    )


# ---------------------------------------------------------------------------------------------------
# JSON round trip (the checkpoint stores the run's config; evaluate.py rebuilds it).


def to_json(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def from_json(data: dict, cls: type = TrainConfig):
    """Inverse of `to_json` for any of our frozen dataclasses (nested, Optional, Path, tuples)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _value(hints[f.name], data[f.name], f"{cls.__name__}.{f.name}")
    return cls(**kwargs)


def _value(tp, value, where: str):
    if value is None:
        return None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _value(next(a for a in args if a is not type(None)), value, where)
    if dataclasses.is_dataclass(tp):
        return from_json(value, tp)
    if tp is pathlib.Path:
        return pathlib.Path(value)
    if origin is tuple:
        return tuple(value)
    if origin is Literal or tp in (int, float, str, bool):
        return value
    raise TypeError(f"config JSON {where}: cannot rebuild a value of type {tp}")
