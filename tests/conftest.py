"""Shape annotations are checked at run time in tests: every public function of eqx_pi05 that carries
jaxtyping annotations is wrapped with beartype by this import hook."""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from jaxtyping import install_import_hook  # noqa: E402

_hook = install_import_hook("eqx_pi05", "beartype.beartype")

import contextlib  # noqa: E402
import pathlib  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "openpi_pi05_tiny"
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"
sys.path.insert(0, str(REPO / "benchmarks"))  # the batch builder tests share with the benchmarks: `from batches import ...`


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Each module's compiled programs are dropped when it ends: one pytest process runs every module,
    and the executables and traces of ~400 tests held at once made a late XLA compile abort
    (test_train_step, full suite only; the module alone passes)."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def fixture_dir() -> pathlib.Path:
    if not (FIXTURE / "cases.npz").exists():
        pytest.skip(f"golden fixture not found at {FIXTURE}")
    return FIXTURE


@pytest.fixture(scope="session")
def golden(fixture_dir):
    """(model, cases, config) of the openpi-produced tiny fixture."""
    from eqx_pi05.parity import load_fixture

    return load_fixture(fixture_dir)


@pytest.fixture(scope="session")
def golden_outputs(golden):
    """Our outputs on every golden case, computed once per session."""
    from eqx_pi05.parity import case_names, compute_case

    model, cases, _ = golden
    return {case: compute_case(model, cases, case) for case in case_names(cases)}


def small_config(**overrides):
    """A fast random-init config: dummy Gemma experts of different widths, 56×56 images (16 patches)."""
    import dataclasses

    from eqx_pi05.config import GEMMA_DUMMY, SiglipConfig, pi05_tiny

    kw = dict(
        paligemma=dataclasses.replace(GEMMA_DUMMY, depth=2),
        action_expert=dataclasses.replace(GEMMA_DUMMY, depth=2, width=32, mlp_dim=64),
        siglip=SiglipConfig(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=14, image_size=56),
        vocab_size=64,
        max_token_len=8,
        action_horizon=4,
    )
    kw.update(overrides)
    return pi05_tiny(**kw)


def random_model(config, seed=0):
    """A model with every leaf random (numpy RNG: no JAX PRNG programs to compile, so it is fast).
    Unlike a fresh init, no path is gated off: adaRMS gates, SigLIP head and norms all carry signal."""
    import numpy as np

    from eqx_pi05.convert import openpi

    rng = np.random.default_rng(seed)
    flat = {}
    for path, leaf in openpi.to_openpi(openpi.abstract_model(config)).items():
        shape = tuple(leaf.shape)
        std = 0.1 if len(shape) < 2 or path.endswith("bias") else 1 / np.sqrt(shape[-2])
        flat[path] = rng.normal(0, std, shape).astype(np.float32)
    return openpi.from_openpi(flat, config)


def free_port() -> int:
    """A TCP port free on the loopback interface now (for servers and coordinators the tests start)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> pathlib.Path:
    """The synthetic demo dataset (train.py --preset demo's), written once per session."""
    from eqx_pi05.train.loop import ensure_demo_dataset

    return ensure_demo_dataset(tmp_path_factory.mktemp("demo") / "demo_dataset")


def small_run(variant: str, data_dir: pathlib.Path, out: pathlib.Path, **changes):
    """`variant` on the demo preset, shrunk: depth-1 experts and SigLIP, 24 prompt tokens, batch 4,
    2 steps logged every step, XLA's fast compile."""
    import dataclasses

    from eqx_pi05.variants import VARIANTS, demo

    cfg = demo(VARIANTS[variant], data_dir)
    depth1 = lambda g: dataclasses.replace(g, depth=1)  # noqa: E731
    model = dataclasses.replace(cfg.model, paligemma=depth1(cfg.model.paligemma), action_expert=depth1(cfg.model.action_expert),
                                siglip=depth1(cfg.model.siglip), max_token_len=24)
    data = dataclasses.replace(cfg.data, max_token_len=24, batch_size=4)
    kw = dict(model=model, data=data, num_train_steps=2, output_dir=out, log_interval=1, save_interval=2,
              keep_checkpoints=2, xla_fast_compile=True, overwrite=False)
    return dataclasses.replace(cfg, **{**kw, **changes})


@contextlib.contextmanager
def compile_counts():
    """Yields a Counter, filled while the block runs, of XLA compilations by jitted function name
    (`jit(name)`), from jax.monitoring's backend-compile events: a jax.jit cache hit compiles nothing."""
    import collections

    import jax

    counts = collections.Counter()

    def listener(event, seconds, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            counts[kwargs["fun_name"]] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@contextlib.contextmanager
def lock_held_by_another_process(directory: pathlib.Path, command: str = "train.py other"):
    """`directory`'s writer lock (eqx_pi05.lock) held by a live child process; yields that process,
    killed (not released: its lock stays behind, stale) when the block ends."""
    import os
    import subprocess
    import sys

    code = f"import time; from eqx_pi05 import lock; lock.acquire({str(directory)!r}, {command!r}); print('held', flush=True); time.sleep(120)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
