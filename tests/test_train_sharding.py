"""Sharding: the same loss and gradients on a 2x4 ("data", "fsdp") mesh as on one device, params
really split by the FSDP rule, and two jax.distributed processes (4 CPU devices each, gloo) that
together compute the single-process loss from their own halves of the batch (and, with the EMA in
pinned host memory, the same FSDP-sharded EMA).

SLOW (marked): three subprocesses run at once (train_sharding_worker.py), about 40 s on two cores.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, free_port

from eqx_pi05.train.sharding import fsdp_spec

WORKER = pathlib.Path(__file__).parent / "train_sharding_worker.py"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    port = str(free_port())
    commands = [["single", str(out)], ["multi", str(out), port, "0"], ["multi", str(out), port, "1"]]
    procs = [subprocess.Popen([sys.executable, str(WORKER), *c], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in commands]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for c, p, log in zip(commands, procs, logs):
        assert p.returncode == 0, f"worker {c} failed:\n{log[-4000:]}"
    single = dict(np.load(out / "single.npz"))
    return single, json.loads((out / "single.json").read_text()), [json.loads((out / f"process{i}.json").read_text()) for i in (0, 1)]


@pytest.mark.slow
def test_loss_and_gradients_on_a_2x4_mesh_equal_one_device(results):
    single, grad_shards, _ = results
    assert abs(float(single["mesh_loss"]) - float(single["loss"])) <= 1e-5 * abs(float(single["loss"]))
    names = [k[len("grad"):] for k in single if k.startswith("grad")]
    assert len(names) > 50
    for name in names:
        ref, got = single[f"grad{name}"], single[f"mesh{name}"]
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=name)
        if np.linalg.norm(ref) > 1e-6:  # (SigLIP's key bias has an exactly-zero gradient: softmax ignores it)
            # float32 sums in another order (one sample per device, reduce-scattered): ~1e-5 of the norm
            assert np.linalg.norm(got - ref) <= 1e-4 * np.linalg.norm(ref), name
    # The gradients come out laid out like the params: every >= 2-D leaf split over fsdp (4) when it can be.
    split = [name for name, (spec, shape, shard) in grad_shards.items() if "fsdp" in spec]
    assert len(split) > 20
    for name, (spec, shape, shard) in grad_shards.items():
        axis = [i for i, (a, b) in enumerate(zip(shape, shard)) if a != b]
        assert ("fsdp" in spec) == bool(axis), name
        if axis:
            assert shard[axis[0]] * 4 == shape[axis[0]], name


@pytest.mark.slow
def test_two_processes_compute_the_single_process_loss(results):
    single, _, processes = results
    for p in processes:
        assert p["devices"] == 8 and p["local_devices"] == 4
        assert p["loss"] == pytest.approx(float(single["loss"]), rel=1e-5)
    assert processes[0]["loss"] == processes[1]["loss"] and processes[0]["grad_norm"] == processes[1]["grad_norm"]
    specs = {name: spec for name, (spec, _, _) in processes[0]["params"].items()}
    assert specs == {name: spec for name, (spec, _, _) in processes[1]["params"].items()}
    assert sum("fsdp" in s for s in specs.values()) > 20  # the train state stays FSDP-sharded after the step
    for p in processes:  # the EMA in pinned host memory: FSDP-sharded like the params, the device EMA's values
        host = p["host_ema"]
        assert host["kinds"] == ["pinned_host"] and host["equal"]
        assert {name: spec for name, (spec, _, _) in host["ema"].items()} == specs


@pytest.mark.parametrize(
    "shape, itemsize, fsdp, min_bytes, expected",
    [
        ((1024, 2048), 4, 1, 0, ()),  # fsdp 1: replicated
        ((4096,), 4, 4, 0, ()),  # 1-D: replicated
        ((64, 64), 4, 4, 4 * 2**20, ()),  # 16 KiB < 4 MiB: replicated
        ((18, 2048, 16384), 4, 4, 4 * 2**20, (None, None, "fsdp")),  # the largest divisible axis
        ((12, 2050, 6), 4, 4, 0, ("fsdp",)),  # 2050 is not divisible by 4: the next largest, 12
        ((8, 8), 4, 4, 0, (None, "fsdp")),  # ties: the last axis, as openpi's reversed argsort
        ((6, 10), 4, 4, 0, ()),  # nothing divisible: replicated
    ],
)
def test_fsdp_spec_follows_openpis_rule(shape, itemsize, fsdp, min_bytes, expected):
    assert tuple(fsdp_spec(shape, itemsize, fsdp, min_bytes)) == expected
