"""Which params train: the freeze filter is openpi's `get_freeze_filter` for every LoRA layout, the
frozen-backbone reading freezes exactly the vision tower more, and the full-size counts of every
variant (abstract models: nothing allocated)."""

import dataclasses
import functools
import re

import equinox as eqx
import jax
import pytest

from eqx_pi05.config import GEMMA_2B_LORA, GEMMA_300M_LORA, pi05_full
from eqx_pi05.convert.openpi import abstract_model, leaf_map
from eqx_pi05.model import count_params
from eqx_pi05.variants import VARIANTS
from eqx_pi05.trainable import PARTS, param_counts, trainable_filter

FULL = 3_353_433_872  # pi05_full, no LoRA
LORA_TOTAL = 3_403_421_456  # gemma_2b_lora + gemma_300m_lora
OPENPI_LORA_TRAINABLE = 466_957_072  # openpi's filter: SigLIP, projections, time MLP and adapters train
FROZEN_BACKBONE_TRAINABLE = 52_153_376  # adapters (49,987,584) and action heads (2,165,792)


def openpi_frozen(config) -> set[str]:
    """openpi's `Pi0Config.get_freeze_filter` as regexes over openpi param paths (the rule this repo
    applied before its filter read the model's own tree)."""
    llm_lora, expert_lora = config.paligemma.lora is not None, config.action_expert.lora is not None
    if not (llm_lora or expert_lora):
        return set()
    llm, expert, lora = re.compile(".*llm.*"), re.compile(".*llm.*_1.*"), re.compile(".*lora.*")

    def frozen(path: str) -> bool:
        if llm_lora:
            hit = llm.fullmatch(path) is not None and (expert_lora or expert.fullmatch(path) is None)
        else:
            hit = expert.fullmatch(path) is not None
        return hit and lora.fullmatch(path) is None

    return {path for path, _ in leaf_map(config) if frozen(path)}


def frozen_paths(config) -> set[str]:
    spec = trainable_filter(abstract_model(config))
    return {path for path, get in leaf_map(config) if not get(spec)}


@pytest.mark.parametrize("llm_lora, expert_lora", [(True, True), (True, False), (False, True), (False, False)])
def test_freeze_filter_is_openpis_and_freeze_vision_adds_exactly_the_vision_tower(llm_lora, expert_lora):
    config = pi05_full(**({"paligemma": GEMMA_2B_LORA} if llm_lora else {}),
                       **({"action_expert": GEMMA_300M_LORA} if expert_lora else {}))
    paths = [path for path, _ in leaf_map(config)]
    assert len(paths) == len(jax.tree.leaves(abstract_model(config)))  # the comparison covers every leaf
    frozen = frozen_paths(config)
    assert frozen == openpi_frozen(config)
    vision = {path for path in paths if path.startswith("PaliGemma/img/")}
    assert frozen_paths(dataclasses.replace(config, freeze_vision=True)) == frozen | vision


@functools.cache
def counts_of(model_config):
    return param_counts(abstract_model(model_config))


def test_trainable_counts_of_every_variant_at_full_size():
    for name, cfg in VARIANTS.items():
        counts = counts_of(cfg.model)
        got = counts["all"]["trainable"], counts["all"]["total"]
        if name.startswith("lora_frozenvision_"):
            assert got == (FROZEN_BACKBONE_TRAINABLE, LORA_TOTAL), name
            assert {p for p in PARTS if counts[p]["trainable"]} == {"lora", "heads"}, name
            assert (counts["lora"]["trainable"], counts["heads"]["trainable"]) == (49_987_584, 2_165_792), name
        elif name.startswith("lora_"):
            assert got == (OPENPI_LORA_TRAINABLE, LORA_TOTAL), name
            assert {p for p in PARTS if counts[p]["trainable"] < counts[p]["total"]} == {"llm", "action_expert"}, name
        else:
            assert got == (FULL, FULL), name
        assert sum(counts[p]["total"] for p in PARTS) == counts["all"]["total"]
    # The report's LoRA rows: "~1.5 % trainable params, frozen backbone"; openpi's filter trains 13.7 %.
    assert 0.014 < FROZEN_BACKBONE_TRAINABLE / LORA_TOTAL < 0.016
    assert 0.13 < OPENPI_LORA_TRAINABLE / LORA_TOTAL < 0.14


def test_counts_are_what_the_filter_partitions():
    config = dataclasses.replace(VARIANTS["lora_frozenvision_wristonly_zero_p1"].model, freeze_vision=False)
    model = abstract_model(config)
    trainable, frozen = eqx.partition(model, trainable_filter(model))
    counts = counts_of(config)
    assert (count_params(trainable), count_params(frozen)) == (
        counts["all"]["trainable"], counts["all"]["total"] - counts["all"]["trainable"])
