"""Grain pipeline: LeRobot source -> transforms -> shuffled, repeated, host-sharded batches.

The stream is defined globally, once, and every process takes its part of it:

    position k of the stream = the k-th frame of the seeded shuffle (reshuffled each epoch)
    global batch s            = positions [s*B, (s+1)*B)
    process p's batch s       = positions [s*B + p*b, s*B + (p+1)*b),  b = B / process_count

so concatenating the processes' local batches in process order gives the single-process global
batch, whatever the process count. Each sample is transformed with its stream position as the
`index` of the view draws, so those do not depend on worker count, batch size or host count either.
Batches are formed before the worker split (`MapDataset.batch`), so worker processes only decide
who computes a batch, never what it holds. `iter(...)` returns a grain `DatasetIterator` whose
`get_state()` / `set_state()` resume exactly where a run stopped (the state is JSON-able). Close
the iterator (`it.close()`), or let it go out of scope, before the interpreter exits: grain's
worker iterators print errors when they are only finalized at shutdown.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grain
import numpy as np

from eqx_pi05.data import norm_stats as _norm_stats
from eqx_pi05.data.data_config import DataConfig
from eqx_pi05.data.lerobot import LeRobotSource
from eqx_pi05.data.tokenizer import Tokenizer
from eqx_pi05.data.transforms import make_transforms

# Per process (parent or worker): threads computing batches, and batches buffered ahead.
READ_THREADS = 2
PREFETCH_BATCHES = 2


def make_data_loader(
    cfg: DataConfig, *, process_index: int | None = None, process_count: int | None = None
) -> grain.IterDataset:
    """Training batches for this process, as configured. Process index/count default to JAX's."""
    source = LeRobotSource(cfg.dataset, cfg.action_horizon, cfg.selected_tasks)
    stats = _norm_stats.load(cfg.norm_stats)
    recorded = _norm_stats.recorded_tasks(cfg.norm_stats)
    if recorded is not None and sorted(recorded) != source.task_names:
        raise ValueError(
            f"norm stats {cfg.norm_stats} were computed on the episodes of {len(recorded)} task(s), the selection "
            f"(data.suites={list(cfg.suites)}, data.tasks={list(cfg.tasks)}) trains on {len(source.task_names)} of "
            f"{cfg.dataset}: compute them on the selection with python -m eqx_pi05.data.norm_stats {cfg.dataset} "
            "--suites/--tasks (the same selection) --output FILE"
        )
    for key, data in (("state", source.state), ("actions", source.actions)):
        if stats[key].q01.shape[-1] != data.shape[-1]:
            raise ValueError(
                f"norm stats {cfg.norm_stats}: {key} has {stats[key].q01.shape[-1]} dims, "
                f"the dataset {cfg.dataset} has {data.shape[-1]}"
            )
    transform = make_transforms(cfg, stats, Tokenizer(cfg.tokenizer, cfg.max_token_len), train=True)
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    return batched_stream(
        source,
        transform,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        shuffle=cfg.shuffle,
        num_epochs=cfg.num_epochs,
        num_workers=cfg.num_workers,
        process_index=process_index,
        process_count=process_count,
    )


def local_batch_size(batch_size: int, process_count: int) -> int:
    if batch_size % process_count:
        raise ValueError(f"global batch_size {batch_size} is not divisible by the process count {process_count}")
    return batch_size // process_count


def batched_stream(
    source,
    transform: Callable[[Any, int], dict],
    *,
    batch_size: int,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
    num_workers: int,
    process_index: int,
    process_count: int,
) -> grain.IterDataset:
    """The stream described in the module docstring, over any random-access `source`."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside 0..{process_count - 1}")
    local = local_batch_size(batch_size, process_count)
    if num_epochs is not None and len(source) * num_epochs < batch_size:
        raise ValueError(f"{source}: {len(source)} samples x {num_epochs} epoch(s) cannot fill one global batch of {batch_size}")
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    ds = ds.map_with_index(_WithIndex(transform))
    ds = ds.batch(local, drop_remainder=True)
    if num_epochs is not None:  # every process must see the same number of batches
        ds = ds[: len(ds) // process_count * process_count]
    ds = ds[process_index::process_count]
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=PREFETCH_BATCHES))
    if num_workers > 0:
        _allow_grain_flags()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=PREFETCH_BATCHES))
        it = it.map(_to_numpy)  # workers hand batches over in shared memory; own a plain copy
    return it


class _WithIndex:
    """grain's map_with_index calls f(index, element); the transforms take (sample, index)."""

    def __init__(self, transform: Callable[[Any, int], dict]):
        self.transform = transform

    def __call__(self, index: int, sample) -> dict:
        return self.transform(sample, index)


def _to_numpy(tree):
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.array(tree, copy=True)


def _allow_grain_flags() -> None:
    """grain reads absl flags when it starts worker processes; without absl's main they are unparsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
