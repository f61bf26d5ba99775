"""The report's variants, by what they do: each is openpi's recipe with one block changed, and each
shows the policy the cameras its row of the report says, at train time, in the loss and at eval
(read through the transform chain and the loss's student selection, not from the config fields)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqx_pi05.cameras import CAMERAS
from eqx_pi05.data.make_demo_dataset import LIBERO_SPATIAL_TASKS
from eqx_pi05.data.norm_stats import NormStats
from eqx_pi05.data.tokenizer import Tokenizer, train_sentencepiece
from eqx_pi05.data.transforms import make_transforms
from eqx_pi05.loss import select_student
from eqx_pi05.model import Observation
from eqx_pi05.variants import PI05_LIBERO, VARIANTS

AGENT = CAMERAS["agentview"]
SAMPLES = 64
# What the policy's agentview is, per report row: at train time (in the batch), as the student sees
# it in the loss (at the run's last step), and at eval (evaluate.py's default --eval-view deployed: a
# camera trained away with view_dropout is given as zeros; --eval-view real gives it the real frame).
# "zeros": black pixels, mask True; "masked": mask False; "mixed": zeros in some samples only.
ROWS = {
    "pi05_libero": ("seen", "seen", "seen"),
    "wristonly_zero": ("zeros", "zeros", "zeros"),  # B1
    "wristonly_physdrop": ("masked", "masked", "masked"),  # B2
    "curriculum_only": ("seen", "removed", "masked"),  # B3: the teacher needs it in the batch
    "selfdistill_only": ("seen", "removed", "masked"),  # B4
    "curric_selfdistill": ("seen", "removed", "masked"),  # B5
    "lora_wristonly_zero_p05": ("mixed", "mixed", "zeros"),
    "lora_wristonly_zero_p1": ("zeros", "zeros", "zeros"),
    "lora_frozenvision_wristonly_zero_p05": ("mixed", "mixed", "zeros"),
    "lora_frozenvision_wristonly_zero_p1": ("zeros", "zeros", "zeros"),
}


def test_every_variant_has_a_row():
    assert set(VARIANTS) == set(ROWS), "a new variant states what its policy sees in ROWS"


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_is_openpis_recipe_with_one_block_changed(name):
    cfg, base = VARIANTS[name], PI05_LIBERO
    changed = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(base, f.name)}
    assert changed <= {"name", "data", "distill", "model", "ema_decay"}, changed
    same_cameras = dict(view_dropout=base.data.view_dropout, view_remove=base.data.view_remove)
    assert dataclasses.replace(cfg.data, **same_cameras, suites=base.data.suites, norm_stats=base.data.norm_stats) == base.data
    experts = dict(paligemma=base.model.paligemma, action_expert=base.model.action_expert, freeze_vision=base.model.freeze_vision)
    assert dataclasses.replace(cfg.model, **experts) == base.model  # LoRA and freezing only: same sizes
    if "ema_decay" in changed:
        assert cfg.is_lora and cfg.ema_decay is None  # openpi's LoRA configs keep no EMA


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = train_sentencepiece(list(LIBERO_SPATIAL_TASKS) * 4, tmp_path_factory.mktemp("tok") / "tokenizer.model")
    return Tokenizer(path, PI05_LIBERO.data.max_token_len)


def _sample():
    rng = np.random.default_rng(0)
    image = lambda: rng.integers(1, 256, (64, 64, 3), dtype=np.uint8)  # noqa: E731
    return {AGENT.client_key: image(), CAMERAS["wrist"].client_key: image(), "observation/state": np.zeros(8, np.float32),
            "prompt": LIBERO_SPATIAL_TASKS[0], "actions": np.zeros((10, 7), np.float32)}


def _seen(outs: list[dict]) -> str:
    states = {"masked" if not o["image_mask"][AGENT.slot] else "zeros" if not o["image"][AGENT.slot].any() else "seen" for o in outs}
    return states.pop() if len(states) == 1 else "mixed"


@pytest.mark.parametrize("name", sorted(ROWS))
def test_each_variant_shows_the_policy_the_cameras_of_its_row(name, tokenizer):
    cfg = VARIANTS[name]
    stats = {k: NormStats(np.zeros(n), np.ones(n), -np.ones(n), np.ones(n)) for k, n in (("state", 8), ("actions", 7))}
    sample = _sample()
    train = [make_transforms(cfg.data, stats, tokenizer, train=True)(sample, index=i) for i in range(SAMPLES)]
    evaluation = [make_transforms(cfg.data, stats, tokenizer, train=False)(sample, index=i) for i in range(SAMPLES)]
    in_loss = _seen(train)
    if cfg.distill is not None:  # the student of the last step, as the loss selects it
        obs = Observation.from_batch({k: np.stack([o[k] for o in train]) if k not in ("image", "image_mask") else
                                      {s: np.stack([o[k][s] for o in train]) for s in train[0][k]} for k in train[0]})
        p = cfg.distill.p_at(cfg.num_train_steps - 1, cfg.num_train_steps)
        student, _ = select_student(obs, cfg.distill.slot, jnp.float32(p), jax.random.key(0), drop=p >= 1, group=False)
        in_loss = "removed" if AGENT.slot not in student.images or not np.asarray(student.image_masks[AGENT.slot]).any() else in_loss
    assert (_seen(train), in_loss, _seen(evaluation)) == ROWS[name]
    real = [make_transforms(cfg.data, stats, tokenizer, train=False, eval_view="real")(sample, index=i) for i in range(SAMPLES)]
    assert _seen(real) == ("seen" if ROWS[name][2] == "zeros" else ROWS[name][2])  # dropout is train-only in the report
