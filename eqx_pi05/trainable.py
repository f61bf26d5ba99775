"""Which params train: one filter over the model's own tree, decided once from its config.

Every leaf of `Pi05` belongs to one part, read from its path in the tree:

    lora           the LoRA adapters (`lora_a`, `lora_b`) wherever they sit
    vision         `img`: the SigLIP tower and its projection to the LLM width
    llm            the PaliGemma LLM: `llm.embedder`, `llm.layers[0]`, `llm.final_norm`
    action_expert  `llm.layers[1]` and `llm.final_norm_1` (adaRMS modulations included)
    heads          the action projections and the time MLP

A part is frozen when its Gemma expert carries LoRA (openpi's `Pi0Config.get_freeze_filter`: the LLM
with `paligemma.lora`, the action expert with `action_expert.lora`) and, with `freeze_vision`, the vision
tower. Adapters and heads always train. Without LoRA and `freeze_vision` everything trains.
"""

from __future__ import annotations

from typing import Literal

import jax
from jaxtyping import PyTree

from eqx_pi05.config import Pi05Config
from eqx_pi05.model import Pi05

Part = Literal["vision", "llm", "action_expert", "lora", "heads"]
PARTS: tuple[Part, ...] = ("vision", "llm", "action_expert", "lora", "heads")


def part_of(path: tuple) -> Part:
    """The part of the leaf at `path` (a `jax.tree_util` key path into a `Pi05`)."""
    names = [getattr(k, "name", getattr(k, "idx", None)) for k in path]
    if names[-1] in ("lora_a", "lora_b"):
        return "lora"
    if names[0] == "img":
        return "vision"
    if names[0] == "llm":
        return "action_expert" if names[1:3] == ["layers", 1] or names[1] == "final_norm_1" else "llm"
    return "heads"


def frozen_parts(config: Pi05Config) -> frozenset[Part]:
    return frozenset(
        part
        for part, frozen in (
            ("vision", config.freeze_vision),
            ("llm", config.paligemma.lora is not None),
            ("action_expert", config.action_expert.lora is not None),
        )
        if frozen
    )


def trainable_filter(model: Pi05) -> PyTree[bool]:
    """Filter spec over `model` (concrete or abstract): True on the params that train (use with `eqx.partition`)."""
    frozen = frozen_parts(model.config)
    return jax.tree_util.tree_map_with_path(lambda path, _: part_of(path) not in frozen, model)


def param_counts(model: Pi05) -> dict[str, dict[str, int]]:
    """{part: {"trainable": n, "total": n}} and the same under "all"; works on abstract models, so the
    full-size counts cost no memory (`jax.eval_shape`)."""
    frozen = frozen_parts(model.config)
    counts = {part: {"trainable": 0, "total": 0} for part in (*PARTS, "all")}
    for path, leaf in jax.tree_util.tree_leaves_with_path(model):
        part, n = part_of(path), int(leaf.size)
        for key in (part, "all"):
            counts[key]["total"] += n
            counts[key]["trainable"] += 0 if part in frozen else n
    return counts


def describe_counts(counts: dict[str, dict[str, int]]) -> str:
    """One line: the trainable fraction, then trainable/total per part."""
    a = counts["all"]
    parts = ", ".join(f"{p} {_short(counts[p]['trainable'])}/{_short(counts[p]['total'])}" for p in PARTS if counts[p]["total"])
    return f"trainable params {a['trainable']:,} of {a['total']:,} ({100 * a['trainable'] / a['total']:.2f} %): {parts}"


def _short(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.{3 if unit == 'B' else 1}f}{unit}"
    return str(n)
