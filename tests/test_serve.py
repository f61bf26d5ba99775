"""The openpi-protocol policy server, on loopback in this process, with a tiny model policy built from
the evaluation's own chain (transforms, eval-time camera removal, unnormalize)."""

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import re
import subprocess
import sys
import time
import urllib.request

import msgpack
import numpy as np
import pytest
import websockets.sync.client
from conftest import REPO, free_port, random_model
from websockets.exceptions import ConnectionClosedError

from eqx_pi05 import serve
from eqx_pi05.config import GEMMA_DUMMY, SIGLIP_TINY, pi05_tiny
from eqx_pi05.data.norm_stats import NormStats
from eqx_pi05.data.tokenizer import Tokenizer, train_sentencepiece
from eqx_pi05.data.transforms import Transforms
from eqx_pi05.eval import policy as eval_policy
from eqx_pi05.eval.audit import RemovalAuditError
from eqx_pi05.eval.run import PolicyInfo
from eqx_pi05.cameras import CameraProbs

PROMPT = "pick up the black bowl and place it on the plate"
TIMEOUT = 60  # seconds for any one client operation: a hung server fails the test, it does not hang it


def _policy(tmp: pathlib.Path, remove_agentview: bool):
    """The evaluation's batched policy on a one-layer model (224² images as the transforms make them)."""
    one = dict(depth=1)
    config = pi05_tiny(paligemma=dataclasses.replace(GEMMA_DUMMY, **one), action_expert=dataclasses.replace(GEMMA_DUMMY, **one),
                       siglip=dataclasses.replace(SIGLIP_TINY, **one), max_token_len=16)
    tokenizer = Tokenizer(train_sentencepiece([PROMPT, "open the drawer"] * 20, tmp / "tokenizer.model"), config.max_token_len)
    stats = {k: NormStats(mean=np.zeros(d), std=np.ones(d), q01=-np.full(d, 2.0), q99=np.full(d, 2.0)) for k, d in (("state", 8), ("actions", 7))}
    transforms = Transforms(norm_stats=stats, tokenizer=tokenizer, discrete_state_input=False, action_horizon=config.action_horizon,
                            view_dropout_seed=0, view_dropout=CameraProbs(), view_remove_seed=0,
                            view_remove=CameraProbs(agentview=1.0 if remove_agentview else 0.0))
    return eval_policy.make_policy(random_model(config), transforms, stats, batch_size=1)


@pytest.fixture(scope="module")
def batched(tmp_path_factory):
    return _policy(tmp_path_factory.mktemp("serve"), remove_agentview=True)


@pytest.fixture(scope="module")
def server(batched):
    with serve.running(serve.from_batched(batched), {"variant": "B2"}) as port:
        yield port


class Client:
    """openpi_client.WebsocketClientPolicy's protocol in a few lines (openpi-client pins numpy<2)."""

    def __init__(self, ws):
        self.ws = ws
        self.metadata = serve.unpackb(ws.recv(timeout=TIMEOUT))

    def send(self, frame) -> object:
        self.ws.send(frame)
        reply = self.ws.recv(timeout=TIMEOUT)
        return reply if isinstance(reply, str) else serve.unpackb(reply)

    def infer(self, obs: dict) -> dict:
        reply = self.send(serve.packb(obs))
        if isinstance(reply, str):
            raise RuntimeError(f"Error in inference server:\n{reply}")
        return reply


@contextlib.contextmanager
def connect(port: int):
    with websockets.sync.client.connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None, open_timeout=TIMEOUT) as ws:
        yield Client(ws)


def request(seed=0, **changes) -> dict:
    rng = np.random.default_rng(seed)
    obs = {
        "observation/image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/state": rng.normal(size=8).astype(np.float32),
        "prompt": PROMPT,
    }
    return {k: v for k, v in {**obs, **changes}.items() if v is not None}


def test_wire_format_is_openpi_msgpack_numpy():
    raw = msgpack.unpackb(serve.packb({"a": np.arange(3, dtype=np.int16), "s": np.float32(1.5)}))
    assert raw["a"] == {b"__ndarray__": True, b"data": np.arange(3, dtype=np.int16).tobytes(), b"dtype": "<i2", b"shape": [3]}
    assert raw["s"] == {b"__npgeneric__": True, b"data": 1.5, b"dtype": "<f4"}
    image = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    by_hand = msgpack.packb({b"__ndarray__": True, b"data": image.tobytes(), b"dtype": "|u1", b"shape": [2, 2, 3]})
    np.testing.assert_array_equal(serve.unpackb(by_hand), image)


def test_client_gets_metadata_first_then_libero_action_chunks_with_timing(server, batched):
    with connect(server) as client:
        assert client.metadata == {"variant": "B2"}
        first, second = client.infer(request(noise_seed=5)), client.infer(request(noise_seed=5))
        # Without a noise_seed each request draws new noise, as openpi's policy splits its rng per call.
        assert not np.array_equal(client.infer(request())["actions"], client.infer(request())["actions"])
    assert first["actions"].shape == (10, 7) and np.isfinite(first["actions"]).all()
    np.testing.assert_array_equal(first["actions"], second["actions"])
    np.testing.assert_array_equal(first["actions"], batched([{**request(), "noise_seed": 5}])[0])
    assert first["server_timing"]["infer_ms"] > 0 and "prev_total_ms" not in first["server_timing"]
    assert second["server_timing"]["prev_total_ms"] >= first["server_timing"]["infer_ms"]
    assert first["policy_timing"]["infer_ms"] > 0


def test_openpi_client_package_runs_unchanged(server):
    client_module = pytest.importorskip("openpi_client.websocket_client_policy", reason="openpi-client not installed (it pins numpy<2)")
    client = client_module.WebsocketClientPolicy(host="127.0.0.1", port=server)
    assert client.get_server_metadata() == {"variant": "B2"}
    assert client.infer(request())["actions"].shape == (10, 7)
    with pytest.raises(RuntimeError, match="missing key"):
        client.infer(request(prompt=None))
    assert client.infer(request())["actions"].shape == (10, 7)


BAD_REQUESTS = {
    "missing key": (serve.packb(request(**{"observation/wrist_image": None})), r"missing key\(s\) \['observation/wrist_image'\]"),
    "wrong image shape": (serve.packb(request(**{"observation/image": np.zeros((224, 224), np.uint8)})), r"'observation/image': expected a uint8 \(h, w, 3\) image, got uint8 array \(224, 224\)"),
    "wrong image dtype": (serve.packb(request(**{"observation/wrist_image": np.zeros((224, 224, 3), np.float32)})), r"expected a uint8 \(h, w, 3\) image, got float32"),
    "wrong state shape": (serve.packb(request(**{"observation/state": np.zeros(7, np.float32)})), r"'observation/state': expected a numeric \(8,\) array, got float32 array \(7,\)"),
    "state not an array": (serve.packb(request(**{"observation/state": "up"})), r"expected a numeric \(8,\) array, got str"),
    "prompt not a string": (serve.packb(request(prompt=3)), r"'prompt': expected a non-empty string, got 3"),
    "not a map": (serve.packb([1, 2]), r"expected a map of observation keys, got list"),
    "object dtype": (msgpack.packb({b"__ndarray__": True, b"data": b"", b"dtype": "|O", b"shape": [0]}), r"dtype object"),
    "garbage bytes": (b"\xc1\xc1\xc1", r"undecodable msgpack"),
    "text frame": ("hello", r"expected a binary msgpack frame"),
    "noise_seed 2**63": (serve.packb(request(noise_seed=2**63)), r"'noise_seed': expected an integer in \[0, 2\*\*32\), got 9223372036854775808"),
    "noise_seed -1": (serve.packb(request(noise_seed=-1)), r"'noise_seed': expected an integer in \[0, 2\*\*32\), got -1"),
    "NaN in state": (serve.packb(request(**{"observation/state": np.array([0, 0, np.nan, 0, 0, 0, 0, 0], np.float32)})), r"'observation/state': expected finite values, got \[0.0, 0.0, nan"),
    "inf in state": (serve.packb(request(**{"observation/state": np.full(8, np.inf)})), r"'observation/state': expected finite values, got \[inf"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_gets_an_error_frame_and_the_same_connection_keeps_serving(server, name):
    frame, message = BAD_REQUESTS[name]
    with connect(server) as client:
        reply = client.send(frame)
        assert isinstance(reply, str) and reply.startswith("bad request: ")
        assert re.search(message, reply), reply
        assert client.infer(request())["actions"].shape == (10, 7)


def test_a_port_in_use_is_found_before_the_model_loads(tmp_path, monkeypatch):
    (tmp_path / "run" / "checkpoints" / "1" / "params").mkdir(parents=True)
    monkeypatch.setattr(serve, "load", lambda *a: pytest.fail("the model was loaded before the port was bound"))
    with serve.bind("127.0.0.1", 0) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=rf"serve: cannot listen on 127.0.0.1:{port} \(.*\); is another server running there"):
            serve.main(serve.Args(checkpoint=tmp_path / "run", port=port))


def test_policy_crash_closes_that_connection_with_1011_and_the_server_keeps_serving():
    def policy(obs):
        if obs["prompt"] == "crash":
            raise ZeroDivisionError("boom")
        return {"actions": np.zeros((10, 7), np.float32)}

    with serve.running(policy) as port:
        with connect(port) as client:
            reply = client.send(serve.packb(request(prompt="crash")))
            assert isinstance(reply, str) and "ZeroDivisionError: boom" in reply
            with pytest.raises(ConnectionClosedError) as closed:
                client.ws.recv(timeout=TIMEOUT)
            assert closed.value.rcvd.code == 1011
        with connect(port) as client:
            assert client.infer(request())["actions"].shape == (10, 7)


def _rss_bytes() -> int:
    return int(pathlib.Path("/proc/self/statm").read_text().split()[1]) * 4096


def test_100_sequential_requests_neither_crash_nor_grow_memory(server):
    if not pathlib.Path("/proc/self/statm").exists():
        pytest.skip("RSS read from /proc (Linux)")
    with connect(server) as client:
        for i in range(10):  # warm-up: compilation and allocator pools
            client.infer(request(i))
        rss, latencies = _rss_bytes(), []
        for i in range(100):
            start = time.perf_counter()
            reply = client.infer(request(i, noise_seed=i))
            latencies.append(time.perf_counter() - start)
            assert reply["actions"].shape == (10, 7) and np.isfinite(reply["actions"]).all()
        growth = _rss_bytes() - rss
    print(f"\n100 requests, one-layer tiny model: median {1000 * np.median(latencies):.1f} ms, "
          f"p90 {1000 * np.percentile(latencies, 90):.1f} ms per request; RSS growth {growth / 2**20:.1f} MiB")
    assert growth < 32 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 100 requests"
    with urllib.request.urlopen(f"http://127.0.0.1:{server}/healthz", timeout=TIMEOUT) as health:
        assert health.status == 200


def test_checkpoint_policy_is_audited_and_the_audit_line_logged_at_start(tmp_path, monkeypatch, caplog):
    """`--checkpoint` goes through eval.policy.load_policy (stubbed here) and the evaluation's removal audit."""
    calls = []

    def load_policy(checkpoint, params, batch_size, eval_view, assets_from_config, remove_agentview=True):
        calls.append((checkpoint, params, batch_size, eval_view))
        info = PolicyInfo(variant="B2", backbone="full-FT", mechanism="view_remove (physical)", checkpoint=str(checkpoint),
                          view_remove_eval={"agentview": 1.0})
        return _policy(tmp_path, remove_agentview), info

    monkeypatch.setattr(eval_policy, "load_policy", load_policy, raising=False)
    with caplog.at_level(logging.INFO, logger="eqx_pi05.serve"):
        policy, metadata = serve.load(tmp_path / "ckpt")
    assert calls == [(tmp_path / "ckpt", "ema", 1, "deployed")]
    assert metadata["camera_removal"] == "eval physical view-removal {agentview=1} audit=pass"
    assert metadata["camera_removal"] in caplog.text
    assert policy(request())["actions"].shape == (10, 7)
    # A checkpoint whose policy still reads the removed camera does not get served.
    monkeypatch.setattr(eval_policy, "load_policy", lambda *a, **k: load_policy(*a, **k, remove_agentview=False))
    with pytest.raises(RemovalAuditError, match="audit=FAIL"):
        serve.load(tmp_path / "ckpt")


def _wait_healthy(port: int, server: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the server exited with {server.returncode}:\n{server.stdout.read()}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as health:
                if health.status == 200:
                    return
        time.sleep(0.5)
    raise AssertionError(f"the server did not answer /healthz within {timeout} s")


@pytest.mark.slow
def test_train_py_checkpoint_served_end_to_end_with_wandb_offline_logging(tmp_path):
    """`python train.py` (demo preset, depth 1, 2 steps then 1 more with --resume, --wandb offline) writes a checkpoint;
    `python -m eqx_pi05.serve --checkpoint` serves it: the audit line at start and in the metadata,
    actions equal to the evaluation policy's for the same noise seed, and the removed agentview
    cannot change them. About 40 s."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "WANDB_SILENT": "true"}  # the demo dataset goes there
    run = tmp_path / "run"
    depth1 = [f"--model.{m}.depth" for m in ("paligemma", "action-expert", "siglip")]

    def train(steps: int, *extra: str) -> None:
        done = subprocess.run([sys.executable, "train.py", "--variant", "wristonly_physdrop", "--preset", "demo", "--num-train-steps",
                               str(steps), "--log-interval", "1", "--output-dir", str(run), "--xla-fast-compile", "--wandb",
                               "--wandb-offline", *(x for flag in depth1 for x in (flag, "1")), *extra],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    started = train(2)
    train(3, "--resume")  # one more step: the same wandb run goes on
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    # wandb (offline, no network) got the same numbers as metrics.jsonl, in one run id across the resume.
    run_id = (run / "wandb_run_id").read_text()
    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [f.name for f in files] == [f"run-{run_id}.wandb"] * 2
    logged = b"".join(f.read_bytes() for f in files)
    # What trains, at start: the console line, config.json and the W&B config (full fine-tune: everything).
    counts = json.loads((run / "config.json").read_text())["param_counts"]
    assert counts["all"]["trainable"] == counts["all"]["total"] > 0 and b"param_counts" in logged
    assert f"trainable params {counts['all']['trainable']:,} of {counts['all']['total']:,} (100.00 %)" in started.stderr
    for r in records:
        for key in ("loss", "bc", "grad_norm"):
            assert json.dumps(r[key]).encode() in logged, (key, r[key])

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "eqx_pi05.serve", "--checkpoint", str(run), "--port", str(port)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_healthy(port, server)
        with connect(port) as client:
            audit = "eval physical view-removal {agentview=1} audit=pass"
            assert client.metadata["variant"] == "wristonly_physdrop" and client.metadata["camera_removal"] == audit
            assert client.metadata["params"] == "ema"
            served = client.infer(request(noise_seed=3))["actions"]
            other_agentview = client.infer(request(noise_seed=3, **{"observation/image": np.full((224, 224, 3), 255, np.uint8)}))["actions"]
    finally:
        server.terminate()
        log = server.communicate(timeout=60)[0]
    assert audit in log
    policy, _ = eval_policy.load_policy(run, params="ema", batch_size=1)
    assert served.shape == (10, 7) and np.isfinite(served).all()
    np.testing.assert_array_equal(served, policy([{**request(), "noise_seed": 3}])[0])
    np.testing.assert_array_equal(other_agentview, served)  # the removed camera cannot change the actions
