"""Throughput of the data pipeline (LeRobot parquet -> transforms -> Grain batches) on this machine.

    python benchmarks/data_loader.py [--dataset DIR] [--workers 0 2] [--output FILE]

Without --dataset it writes the synthetic demo dataset to a temporary directory first. Prints
samples/s of the full pipeline per worker count, and where one sample's time goes (measured in
this process, one stage at a time); writes both as JSON (default benchmarks/results/data_loader.json).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
import tempfile
import time

import grain
import numpy as np
import tyro

from eqx_pi05.data import images, norm_stats
from eqx_pi05.data.data_config import DataConfig
from eqx_pi05.data.lerobot import IMAGE_FEATURES, LeRobotSource
from eqx_pi05.data.make_demo_dataset import make_demo_dataset
from eqx_pi05.data.pipeline import make_data_loader
from eqx_pi05.data.tokenizer import Tokenizer
from eqx_pi05.data.transforms import libero_inputs, normalize, pad_state_actions, resize_images, stack, tokenize
from eqx_pi05.cameras import CameraProbs, ViewRemoveConfig, apply_view_remove

RESULTS = pathlib.Path(__file__).parent / "results" / "data_loader.json"


def stage_times(cfg: DataConfig, samples: int, seed: int = 0) -> dict[str, float]:
    """Milliseconds per sample of each stage, on random frames (as the shuffled loader reads them)."""
    source = LeRobotSource(cfg.dataset, cfg.action_horizon, cfg.selected_tasks)
    stats = norm_stats.load(cfg.norm_stats)
    tokenizer = Tokenizer(cfg.tokenizer, cfg.max_token_len)
    removal = CameraProbs(agentview=1.0)
    totals = dict.fromkeys(["read parquet", "decode png", "repack + views", "normalize", "resize 224", "tokenize", "pad", "stack batch"], 0.0)
    outputs = []
    for i in np.random.default_rng(seed).integers(0, len(source), samples):

        def timed(stage, fn, *args):
            start = time.perf_counter()
            out = fn(*args)
            totals[stage] += time.perf_counter() - start
            return out

        data = timed("read parquet", lambda: {f: source._image_bytes(i, f) for f in IMAGE_FEATURES.values()})
        decoded = timed("decode png", lambda: [images.decode_image(data[f]) for f in IMAGE_FEATURES.values()])
        raw = {"observation/image": decoded[0], "observation/wrist_image": decoded[1], "observation/state": source.state[i],
               "actions": source.actions[np.minimum(np.arange(i, i + cfg.action_horizon), source._episode_end[i])],
               "prompt": source.tasks[int(source.task_index[i])]}
        x = timed("repack + views", lambda: apply_view_remove(libero_inputs(raw), int(i), 0, removal))
        x = timed("normalize", normalize, x, stats)
        x = timed("resize 224", resize_images, x)
        x = timed("tokenize", tokenize, x, tokenizer, cfg.discrete_state_input)
        outputs.append(timed("pad", pad_state_actions, x))
    start = time.perf_counter()
    for k in range(0, len(outputs), cfg.batch_size):
        stack(outputs[k : k + cfg.batch_size])
    totals["stack batch"] = time.perf_counter() - start
    return {stage: 1000 * t / samples for stage, t in totals.items()}


def throughput(cfg: DataConfig, batches: int, warmup: int = 3) -> dict[str, float]:
    start = time.perf_counter()
    it = iter(make_data_loader(cfg, process_index=0, process_count=1))
    for _ in range(warmup):
        next(it)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    elapsed = time.perf_counter() - start
    it.close()
    return {"workers": cfg.num_workers, "samples_per_s": batches * cfg.batch_size / elapsed, "startup_s": first}


def main(
    dataset: pathlib.Path | None = None,
    workers: tuple[int, ...] = (0, 2),
    batch_size: int = 32,
    batches: int = 40,
    stage_samples: int = 256,
    output: pathlib.Path = RESULTS,
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = dataset or make_demo_dataset(pathlib.Path(tmp) / "demo")
        cfg = DataConfig(
            dataset=root,
            tokenizer=root / "tokenizer.model",
            norm_stats=root / "norm_stats.json",
            max_token_len=48,
            batch_size=batch_size,
            # The paper's B2 setting: agentview removed at p=0.5 here so both branches are exercised.
            view_remove=ViewRemoveConfig(seed=0, train=CameraProbs(agentview=0.5)),
        )
        info = json.loads((root / "meta" / "info.json").read_text())
        source = LeRobotSource(root, cfg.action_horizon)
        png_kb = np.mean([len(source._image_bytes(i, "image")) for i in range(0, len(source), max(1, len(source) // 50))]) / 1024
        runs = [throughput(dataclasses.replace(cfg, num_workers=w), batches) for w in workers]
        stages = stage_times(cfg, stage_samples)

    total = sum(stages.values())
    load = os.getloadavg()[0]  # other work on the machine shares the cores: read the figures with it
    print(f"dataset: {root} ({info.get('source', 'LeRobot ' + info['codebase_version'])}), {len(source)} frames, "
          f"agentview PNG {png_kb:.0f} KB on average; batch {batch_size}, {os.cpu_count()} CPU cores, load average {load:.1f}")
    print(f"\n{'workers':>8} {'samples/s':>10} {'startup s':>10}")
    for run in runs:
        print(f"{run['workers']:>8} {run['samples_per_s']:>10.0f} {run['startup_s']:>10.1f}")
    print(f"\nwhere one sample's time goes (one process, {stage_samples} random frames): {total:.2f} ms/sample "
          f"= {1000 / total:.0f} samples/s per core")
    for stage, ms in stages.items():
        print(f"  {stage:<16} {ms:6.3f} ms  {100 * ms / total:5.1f} %")
    result = {
        "machine": {"cpu_count": os.cpu_count(), "load_average_1min": load, "python": platform.python_version(), "grain": grain.__version__},
        "dataset": {"source": info.get("source", "LeRobot"), "frames": len(source), "agentview_png_kb": png_kb},
        "batch_size": batch_size,
        "throughput": runs,
        "stage_ms_per_sample": stages,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {output}")


if __name__ == "__main__":
    tyro.cli(main)
