import dataclasses
import json

import jax
import numpy as np
import pytest
from batches import abstract_batch, random_batch

from eqx_pi05.config import pi05_tiny
from eqx_pi05.data.data_config import DataConfig
from eqx_pi05.data.make_demo_dataset import make_demo_dataset
from eqx_pi05.data.pipeline import batched_stream, local_batch_size, make_data_loader
from eqx_pi05.cameras import CameraProbs, ViewRemoveConfig


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    root = make_demo_dataset(tmp_path_factory.mktemp("demo"))
    return DataConfig(
        dataset=root,
        tokenizer=root / "tokenizer.model",
        norm_stats=root / "norm_stats.json",
        max_token_len=48,
        batch_size=8,
        num_workers=0,
        view_remove=ViewRemoveConfig(seed=3, train=CameraProbs(agentview=0.5)),
    )


def _take(ds, n, state=None):
    it = iter(ds)
    if state is not None:
        it.set_state(state)
    batches = [next(it) for _ in range(n)]
    return batches, it.get_state()


def _assert_same(a, b, where=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    else:
        np.testing.assert_array_equal(a, b, err_msg=where)


def test_batches_have_the_model_interface(cfg):
    batch = next(iter(make_data_loader(cfg, process_index=0, process_count=1)))
    slots = ["base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"]
    assert list(batch["image"]) == slots and list(batch["image_mask"]) == slots
    for k in slots:
        assert batch["image"][k].shape == (8, 224, 224, 3) and batch["image"][k].dtype == np.uint8
        assert batch["image_mask"][k].shape == (8,) and batch["image_mask"][k].dtype == np.bool_
    assert not batch["image_mask"]["right_wrist_0_rgb"].any() and not batch["image"]["right_wrist_0_rgb"].any()
    assert batch["state"].shape == (8, 32) and batch["state"].dtype == np.float32
    assert batch["actions"].shape == (8, 10, 32) and batch["actions"].dtype == np.float32
    assert batch["tokenized_prompt"].shape == (8, 48) and batch["tokenized_prompt"].dtype == np.int32
    assert batch["tokenized_prompt_mask"].dtype == np.bool_
    assert type(batch["state"]) is np.ndarray


def test_the_batches_of_tests_and_benchmarks_have_the_pipelines_layout(cfg):
    batch = next(iter(make_data_loader(cfg, process_index=0, process_count=1)))
    layout = lambda tree: jax.tree.map(lambda x: (tuple(x.shape), np.dtype(x.dtype)), tree)  # noqa: E731
    config = pi05_tiny(max_token_len=cfg.max_token_len)  # the demo dataset's horizon (10) and state/action width (32)
    assert layout(abstract_batch(config, cfg.batch_size)) == layout(batch)
    assert layout(random_batch(config, cfg.batch_size)) == layout(batch)


def test_two_worker_counts_yield_identical_batches_and_a_restored_iterator_continues_identically(cfg):
    serial, _ = _take(make_data_loader(cfg, process_index=0, process_count=1), 6)
    parallel = make_data_loader(dataclasses.replace(cfg, num_workers=2), process_index=0, process_count=1)
    first, state = _take(parallel, 3)
    state = json.loads(json.dumps(state))  # the state travels as JSON (e.g. beside a checkpoint)
    resumed, _ = _take(parallel, 3, state=state)  # a fresh iterator (new workers) restored from the state
    for i, (a, b) in enumerate(zip(serial, first + resumed)):
        _assert_same(a, b, f"batch {i}")


def test_restored_iterator_continues_identically(cfg):
    ds = make_data_loader(cfg, process_index=0, process_count=1)
    straight, _ = _take(ds, 5)
    _, state = _take(ds, 2)
    resumed, _ = _take(ds, 3, state=json.loads(json.dumps(state)))
    for i, (a, b) in enumerate(zip(straight[2:], resumed)):
        _assert_same(a, b, f"batch {i + 2}")


def test_processes_split_each_global_batch_in_order(cfg):
    single, _ = _take(make_data_loader(cfg, process_index=0, process_count=1), 3)
    parts = [_take(make_data_loader(cfg, process_index=p, process_count=2), 3)[0] for p in range(2)]
    for step in range(3):
        assert parts[0][step]["state"].shape == (4, 32)
        joined = {k: np.concatenate([parts[0][step][k], parts[1][step][k]]) for k in ("state", "actions", "tokenized_prompt")}
        for k, v in joined.items():
            np.testing.assert_array_equal(v, single[step][k], err_msg=f"step {step} {k}")
        np.testing.assert_array_equal(
            np.concatenate([parts[0][step]["image_mask"]["base_0_rgb"], parts[1][step]["image_mask"]["base_0_rgb"]]),
            single[step]["image_mask"]["base_0_rgb"],
        )


def test_view_draws_do_not_depend_on_batch_size(cfg):
    small, _ = _take(make_data_loader(dataclasses.replace(cfg, batch_size=4), process_index=0, process_count=1), 6)
    large, _ = _take(make_data_loader(cfg, process_index=0, process_count=1), 3)
    masks = lambda batches: np.concatenate([b["image_mask"]["base_0_rgb"] for b in batches])  # noqa: E731
    states = lambda batches: np.concatenate([b["state"] for b in batches])  # noqa: E731
    np.testing.assert_array_equal(states(small), states(large))
    np.testing.assert_array_equal(masks(small), masks(large))
    assert 0 < masks(large).sum() < len(masks(large)), "p=0.5 should remove some agentviews and keep others"
    removed = ~masks(large)
    assert not np.concatenate([b["image"]["base_0_rgb"] for b in large])[removed].any()


class _Numbers:
    """A random-access source of ints, to test the stream logic without images."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return int(i)


def _index_transform(sample, index):
    return {"sample": np.int64(sample), "position": np.int64(index)}


def _stream(n=10, **kw):
    args = dict(batch_size=5, seed=1, shuffle=True, num_epochs=3, num_workers=0, process_index=0, process_count=1)
    return list(batched_stream(_Numbers(n), _index_transform, **{**args, **kw}))


def test_each_epoch_is_a_fresh_seeded_permutation_and_the_stream_ends():
    batches = _stream()
    samples = np.concatenate([b["sample"] for b in batches])
    assert len(samples) == 30
    epochs = samples.reshape(3, 10)
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert not np.array_equal(epochs[0], epochs[1]), "each epoch must be reshuffled"
    np.testing.assert_array_equal(np.concatenate([b["position"] for b in batches]), np.arange(30))
    np.testing.assert_array_equal(samples, np.concatenate([b["sample"] for b in _stream()]))
    assert not np.array_equal(samples, np.concatenate([b["sample"] for b in _stream(seed=2)]))
    ordered = np.concatenate([b["sample"] for b in _stream(shuffle=False)])
    np.testing.assert_array_equal(ordered, np.tile(np.arange(10), 3))


def test_finite_stream_gives_every_process_the_same_number_of_batches():
    # 7 samples x 3 epochs = 21 = 10.5 global batches of 2: both processes stop after 10 (a process
    # that took an 11th step alone would hang a multi-host run).
    parts = [_stream(n=7, batch_size=2, process_index=p, process_count=2) for p in range(2)]
    assert [len(p) for p in parts] == [10, 10]
    positions = np.stack([np.concatenate([b["position"] for b in p]) for p in parts], axis=1).ravel()
    np.testing.assert_array_equal(positions, np.arange(20))


def test_global_batch_must_split_evenly_over_processes():
    assert local_batch_size(32, 4) == 8
    with pytest.raises(ValueError, match="batch_size 30 is not divisible by the process count 4"):
        local_batch_size(30, 4)
    with pytest.raises(ValueError, match=r"cannot fill one global batch of 50"):
        _stream(n=10, batch_size=50, num_epochs=1)


def test_norm_stats_of_another_dimension_are_rejected(cfg, tmp_path):
    stats = json.loads(cfg.norm_stats.read_text())
    for field in ("mean", "std", "q01", "q99"):
        stats["norm_stats"]["state"][field] = stats["norm_stats"]["state"][field][:7]
    path = tmp_path / "norm_stats.json"
    path.write_text(json.dumps(stats))
    with pytest.raises(ValueError, match="state has 7 dims, the dataset .* has 8"):
        make_data_loader(dataclasses.replace(cfg, norm_stats=path), process_index=0, process_count=1)
