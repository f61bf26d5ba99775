"""eqx_pi05.checkpoints: the one module every checkpoint is read and written through."""

import jax
import numpy as np

from conftest import random_model, small_config

from eqx_pi05 import checkpoints
from eqx_pi05.convert import lerobot, openpi


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_load_weights_reads_openpi_orbax_and_lerobot_safetensors_to_the_same_model(tmp_path):
    config = small_config()
    model = random_model(config)
    openpi.save_checkpoint(model, tmp_path / "params")
    lerobot.save(model, tmp_path / "pretrained_model")
    assert _same(checkpoints.load_weights(tmp_path / "params", config), model)
    assert _same(checkpoints.load_weights(tmp_path / "pretrained_model", config), model)
    assert _same(checkpoints.load_weights(tmp_path / "pretrained_model" / "model.safetensors", config), model)
