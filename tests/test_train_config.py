"""Training configs: contradictions fail at construction (what the variants do: test_variants.py),
the curriculum and LR schedule have the report's / openpi's values, the CLI builds the config."""

import dataclasses
import math
import pathlib
import sys

import numpy as np
import pytest
import tyro

from eqx_pi05.cameras import CameraProbs, ViewDropoutConfig, ViewRemoveConfig
from eqx_pi05.loss import curriculum_p
from eqx_pi05.variants import VARIANTS, DistillConfig, TrainConfig, closed_loop, demo, from_json, to_json
from eqx_pi05.train.metrics import MetricsLog, read
from eqx_pi05.train.optimizer import lr_schedule

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import train as train_cli  # noqa: E402

B5 = VARIANTS["curric_selfdistill"]


@pytest.mark.parametrize(
    "change, fields",
    [
        (dict(data=dataclasses.replace(B5.data, view_remove=ViewRemoveConfig(train=CameraProbs(agentview=0.5)))),
         ["data.view_remove.train.agentview", "distill.camera"]),
        (dict(data=dataclasses.replace(B5.data, view_remove=ViewRemoveConfig(), view_dropout=ViewDropoutConfig(train=CameraProbs(agentview=1.0)))),
         ["data.view_dropout.train.agentview"]),
        (dict(distill=dataclasses.replace(B5.distill, teacher="ema"), ema_decay=None), ["distill.teacher='ema'", "ema_decay=None"]),
        (dict(data=dataclasses.replace(B5.data, max_token_len=48)), ["data.max_token_len", "model.max_token_len"]),
        (dict(distill=dataclasses.replace(B5.distill, teacher="ema"), ema_memory="host"), ["distill.teacher='ema'", "ema_memory='host'"]),
        (dict(ema_memory="host", ema_decay=None), ["ema_memory='host'", "ema_decay=None"]),
        (dict(augment_black_frames=False, augment=False), ["augment_black_frames=False", "augment=False"]),
    ],
)
def test_contradictory_train_configs_fail_naming_the_fields(change, fields):
    with pytest.raises(ValueError) as e:
        dataclasses.replace(B5, **change)
    for field in fields:
        assert field in str(e.value)


def test_view_dropout_and_view_remove_on_one_camera_fail():
    with pytest.raises(ValueError, match="view_dropout.train.agentview=1.0 and view_remove"):
        dataclasses.replace(VARIANTS["wristonly_physdrop"].data, view_dropout=ViewDropoutConfig(train=CameraProbs(agentview=1.0)))


@pytest.mark.parametrize(
    "kwargs, fields",
    [
        (dict(anchor_frac=0.15, schedule="curriculum", curriculum_frac=0.75, teacher="self"), ["distill.lam"]),
        (dict(lam=1.0, schedule="curriculum", curriculum_frac=0.75, teacher="self"), ["distill.anchor_frac"]),
        (dict(lam=1.0, anchor_frac=0.15, curriculum_frac=0.75, teacher="self"), ["distill.schedule"]),
        (dict(lam=1.0, anchor_frac=0.15, schedule="curriculum", teacher="self"), ["distill.curriculum_frac"]),
        (dict(lam=1.0, anchor_frac=0.15, schedule="constant", teacher="self"), ["distill.p"]),
        (dict(lam=1.0, anchor_frac=0.15, schedule="curriculum", curriculum_frac=0.75, p=1.0, teacher="self"), ["distill.p", "curriculum"]),
        (dict(lam=1.0, anchor_frac=0.15, schedule="constant", p=1.0), ["distill.teacher"]),
        (dict(lam=0.0, anchor_frac=0.0, schedule="constant", p=1.0, teacher="self"), ["distill.teacher", "distill.lam=0"]),
        (dict(lam=1.0, anchor_frac=0.15, schedule="constant", p=1.0, teacher="checkpoint"), ["distill.teacher_checkpoint"]),
        (dict(lam=1.0, anchor_frac=0.15, schedule="constant", p=1.0, teacher="self", teacher_checkpoint=pathlib.Path("x")),
         ["distill.teacher_checkpoint"]),
    ],
)
def test_distillation_knobs_have_no_silent_defaults(kwargs, fields):
    with pytest.raises(ValueError) as e:
        DistillConfig(**kwargs)
    for field in fields:
        assert field in str(e.value)


def test_curriculum_ramps_from_zero_to_one_over_the_first_75_percent_then_holds():
    n = 1000
    assert curriculum_p(0, n, 0.75) == 0.0
    assert curriculum_p(375, n, 0.75) == pytest.approx(0.5, abs=1e-12)
    assert curriculum_p(750, n, 0.75) == 1.0 and curriculum_p(999, n, 0.75) == 1.0
    assert curriculum_p(100, n, 0.75) == pytest.approx(0.5 * (1 - math.cos(math.pi * 100 / 750)), abs=1e-15)
    ps = [curriculum_p(s, n, 0.75) for s in range(n)]
    assert all(a <= b for a, b in zip(ps, ps[1:]))
    assert B5.distill.p_at(0, n) == 0.0 and VARIANTS["selfdistill_only"].distill.p_at(0, n) == 1.0


def test_lr_schedule_is_openpis_warmup_then_cosine():
    cfg = dataclasses.replace(B5.lr, warmup_steps=10, peak_lr=1e-3, decay_steps=110, decay_lr=1e-4)
    lr = lr_schedule(cfg)
    assert float(lr(0)) == pytest.approx(1e-3 / 11, rel=1e-6)
    assert float(lr(10)) == pytest.approx(1e-3, rel=1e-6)
    assert float(lr(60)) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4), rel=1e-5)  # cosine half-way
    assert float(lr(500)) == pytest.approx(1e-4, rel=1e-6)
    assert float(lr_schedule(B5.lr)(20_000)) == pytest.approx(5e-5, rel=1e-6)  # pi05_libero: constant after warm-up


def test_config_json_round_trips_every_variant_and_the_demo_preset():
    for cfg in [*VARIANTS.values(), demo(B5, pathlib.Path("/data/demo"))]:
        assert from_json(to_json(cfg)) == cfg


def test_cli_builds_the_variant_with_preset_and_overrides():
    cfg = train_cli.parse(["--variant", "curric_selfdistill", "--preset", "demo", "--num-train-steps", "7",
                           "--output-dir", "runs/x", "--resume", "--distill.lam", "0.5", "--data.batch-size", "4"])
    assert cfg.name == "curric_selfdistill" and cfg.num_train_steps == 7 and cfg.resume
    assert cfg.output_dir == pathlib.Path("runs/x") and cfg.distill.lam == 0.5 and cfg.data.batch_size == 4
    assert cfg.model.paligemma.width == 64 and cfg.data.dataset == train_cli.DEMO_DATA and cfg.weights is None
    lora = train_cli.parse(["--variant", "lora_wristonly_zero_p05", "--preset", "demo"])
    assert lora.model.paligemma.lora is not None and lora.model.action_expert.lora is not None
    assert np.isclose(lora.data.view_dropout.train.agentview, 0.5)
    with pytest.raises(SystemExit):
        train_cli.parse(["--preset", "demo"])  # no variant
    with pytest.raises(SystemExit):
        train_cli.parse(["--variant", "curric_selfdistill", "--distill.lam", "x"])


@pytest.mark.parametrize("preset", [None, "demo", "closed_loop"])
def test_cli_gives_every_variant_on_every_preset_as_the_preset_builds_it_and_overrides_win(preset):
    """`--variant NAME [--preset P]` and tyro's subcommand `NAME[_P]` give the config the preset function
    builds from the variant; flags override its fields exactly as tyro.cli(TrainConfig, default=...),
    the pre-parser train.py had before overridable_config_cli, applied them."""
    build = {None: lambda cfg: cfg, "demo": lambda cfg: demo(cfg, train_cli.DEMO_DATA), "closed_loop": closed_loop}[preset]
    flags = ["--preset", preset] if preset else []
    overrides = ["--num-train-steps", "3", "--lr.warmup-steps", "1", "--lr.decay-steps", "3", "--seed", "5"]
    for name, variant in VARIANTS.items():
        want = build(variant)
        assert train_cli.parse(["--variant", name, *flags]) == want, name
        old = tyro.cli(TrainConfig, default=want, args=overrides, config=(tyro.conf.AvoidSubcommands,))
        lr = dataclasses.replace(want.lr, warmup_steps=1, decay_steps=3)
        assert old == dataclasses.replace(want, num_train_steps=3, lr=lr, seed=5)
        assert train_cli.parse([*overrides, *flags, f"--variant={name}"]) == old, name  # flags in any order
        assert train_cli.parse([name + (f"_{preset}" if preset else ""), *overrides]) == old, name


def test_metrics_log_writes_one_json_line_per_step_and_wandb_offline(tmp_path):
    pytest.importorskip("wandb")
    log = MetricsLog(tmp_path / "metrics.jsonl", start=0,
                     wandb_run=dict(project="test", name="t", dir=str(tmp_path), mode="offline", config={}))
    log.write(0, {"loss": 1.5, "p": 0.0})
    log.write(10, {"loss": float("nan"), "p": 1.0})
    log.close()
    records = read(tmp_path / "metrics.jsonl")
    assert records[0] == {"step": 0, "loss": 1.5, "p": 0.0} and records[1]["step"] == 10 and math.isnan(records[1]["loss"])
    assert list((tmp_path / "wandb").glob("offline-run-*"))  # written locally, no network


@pytest.mark.parametrize("flags, message", [
    (["--distill.lam", "nan"], "distill.lam=nan: expected a finite number"),
    (["--lr.peak-lr", "-1"], "lr.peak_lr=-1.0: expected a finite number > 0"),
    (["--lr.decay-lr", "inf"], "lr.decay_lr=inf: expected a finite number"),
    (["--optimizer.b2", "1.0"], "optimizer.b2=1.0: expected a finite number >= 0 and < 1"),
    (["--optimizer.clip-gradient-norm", "0"], "optimizer.clip_gradient_norm=0.0: expected a finite number > 0"),
    (["--ema-decay", "nan"], "ema_decay"),
])
def test_numeric_flags_reject_nan_inf_and_out_of_range_values_at_start_naming_the_field(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        train_cli.parse(["--variant", "curric_selfdistill", "--preset", "demo", *flags])
    assert exit_.value.code == 2
    assert message in " ".join(capsys.readouterr().err.split())  # tyro's box wraps long lines
