"""A websocket policy server speaking openpi's protocol, so openpi's LIBERO and robot clients run unchanged.

    python -m eqx_pi05.serve --checkpoint DIR [--port 8000] [--host 127.0.0.1] [--params ema|params]

Protocol (openpi `src/openpi/serving/websocket_policy_server.py`, `packages/openpi-client`):
- binary frames of msgpack, numpy arrays encoded as `openpi_client.msgpack_numpy` does
  ({"__ndarray__": True, "data", "dtype", "shape"}; scalars {"__npgeneric__": True, "data", "dtype"});
- on connect the server sends its metadata (a map), then answers each observation with
  {"actions": (horizon, 7), "policy_timing": {"infer_ms"}, "server_timing": {"infer_ms", "prev_total_ms"}};
- an error is answered with a text frame, which openpi's client raises as RuntimeError. After a bad
  request (missing key, wrong shape or dtype, undecodable frame) the connection stays open and the
  next request is served; after an unexpected exception the server closes the connection with 1011
  and the traceback, as openpi does. Either way the server keeps accepting connections.
- `GET /healthz` answers 200.

Requests are openpi's LIBERO observation: `observation/image` and `observation/wrist_image` uint8
(h, w, 3), `observation/state` (8,), `prompt` str; an optional integer `noise_seed` (ours) fixes the
sampling noise, otherwise each request takes the next number of a per-server counter. The camera
removal is the checkpoint's training variant, checked by the evaluation's removal audit at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import http
import itertools
import logging
import pathlib
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import msgpack
import numpy as np

from eqx_pi05.cameras import CLIENT_KEYS

log = logging.getLogger("eqx_pi05.serve")

# One openpi observation -> {"actions": (horizon, 7), ...}: what the server calls.
ServerPolicy = Callable[[dict], dict]

STATE_KEY, PROMPT_KEY, SEED_KEY = "observation/state", "prompt", "noise_seed"
LIBERO_STATE_DIM = 8
MAX_MESSAGE_BYTES = 64 * 2**20  # openpi sets no limit; this still takes full-HD camera frames


class BadRequest(ValueError):
    """The request, not the server, is at fault: answered with an error frame, the connection stays open."""


def _pack_array(obj):
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in "VOc":
        raise ValueError(f"msgpack: unsupported dtype {obj.dtype}")
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    return obj


def _unpack_array(obj: dict):
    if b"__ndarray__" in obj:
        dtype = np.dtype(obj[b"dtype"])
        if dtype.kind in "VOc":
            raise BadRequest(f"array of dtype {dtype}: expected a numeric or bool dtype")
        return np.ndarray(buffer=obj[b"data"], dtype=dtype, shape=tuple(obj[b"shape"]))
    if b"__npgeneric__" in obj:
        return np.dtype(obj[b"dtype"]).type(obj[b"data"])
    return obj


def packb(obj: Any) -> bytes:
    """msgpack bytes, numpy arrays as openpi_client.msgpack_numpy writes them."""
    return msgpack.packb(obj, default=_pack_array)


def unpackb(data: bytes) -> Any:
    return msgpack.unpackb(data, object_hook=_unpack_array)


def _describe(x: object) -> str:
    return f"{x.dtype} array {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__


def check_request(obs: object, state_dim: int = LIBERO_STATE_DIM) -> dict:
    """The request if it is a well-formed LIBERO observation; BadRequest saying what is wrong otherwise."""
    if not isinstance(obs, dict):
        raise BadRequest(f"request: expected a map of observation keys, got {type(obs).__name__}")
    missing = [k for k in (*CLIENT_KEYS, STATE_KEY, PROMPT_KEY) if k not in obs]
    if missing:
        raise BadRequest(f"request: missing key(s) {missing}; it has {sorted(map(str, obs))}")
    for key in CLIENT_KEYS:
        image = obs[key]
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3 and image.size):
            raise BadRequest(f"request {key!r}: expected a uint8 (h, w, 3) image, got {_describe(image)}")
    state = obs[STATE_KEY]
    if not (isinstance(state, np.ndarray) and state.dtype.kind in "fiu" and state.shape == (state_dim,)):
        raise BadRequest(f"request {STATE_KEY!r}: expected a numeric ({state_dim},) array, got {_describe(state)}")
    if not np.isfinite(state).all():
        raise BadRequest(f"request {STATE_KEY!r}: expected finite values, got {state.tolist()}")
    if not isinstance(obs[PROMPT_KEY], str) or not obs[PROMPT_KEY].strip():
        raise BadRequest(f"request {PROMPT_KEY!r}: expected a non-empty string, got {obs[PROMPT_KEY]!r:.80}")
    if SEED_KEY in obs:
        seed = obs[SEED_KEY]
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, (bool, np.bool_)):
            raise BadRequest(f"request {SEED_KEY!r}: expected an integer, got {type(seed).__name__}")
        if not 0 <= int(seed) < 2**32:  # folded into a JAX key as a uint32
            raise BadRequest(f"request {SEED_KEY!r}: expected an integer in [0, 2**32), got {int(seed)}")
    return obs


def from_batched(policy: Callable[[list[dict]], np.ndarray]) -> ServerPolicy:
    """The evaluation's batched policy (observations -> (n, horizon, 7)) as a one-observation server
    policy. Its `infer_ms` includes fetching the actions from the device (openpi's does not, #983)."""
    counter = itertools.count()

    def infer(obs: dict) -> dict:
        seed = next(counter)
        obs = {**obs, SEED_KEY: int(obs.get(SEED_KEY, seed))}
        start = time.monotonic()
        actions = np.asarray(policy([obs]))[0]
        return {"actions": actions, "policy_timing": {"infer_ms": (time.monotonic() - start) * 1000}}

    return infer


async def _connection(ws, policy: ServerPolicy, metadata: Mapping) -> None:
    import websockets

    peer = ws.remote_address
    log.info("connection from %s opened", peer)
    await ws.send(packb(dict(metadata)))
    prev_total_ms = None
    try:
        async for message in ws:  # ends when the client closes the connection
            start = time.monotonic()
            try:
                if not isinstance(message, bytes):
                    raise BadRequest("request: expected a binary msgpack frame, got a text frame")
                try:
                    obs = unpackb(message)
                except BadRequest:
                    raise
                except Exception as err:  # noqa: BLE001 - msgpack raises many types for malformed input
                    raise BadRequest(f"request: undecodable msgpack ({type(err).__name__}: {err})") from None
                infer_start = time.monotonic()
                response = dict(policy(check_request(obs)))
                timing = {"infer_ms": (time.monotonic() - infer_start) * 1000}
            except BadRequest as err:
                log.warning("bad request from %s: %s", peer, err)
                await ws.send(f"bad request: {err}")
                continue
            except Exception:  # noqa: BLE001 - reported to the client, as openpi does
                log.exception("policy failed on a request from %s", peer)
                await ws.send(traceback.format_exc())
                await ws.close(websockets.frames.CloseCode.INTERNAL_ERROR, "Internal server error. Traceback included in previous frame.")
                return
            if prev_total_ms is not None:  # the total of a request includes its send: known one request later
                timing["prev_total_ms"] = prev_total_ms
            await ws.send(packb({**response, "server_timing": timing}))
            prev_total_ms = (time.monotonic() - start) * 1000
    except websockets.ConnectionClosed:
        pass
    log.info("connection from %s closed", peer)


def _health(connection, request):
    return connection.respond(http.HTTPStatus.OK, "OK\n") if request.path == "/healthz" else None


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0 picks a free one); an OSError naming the address when
    it is taken, so `main` finds out before it spends seconds loading the model."""
    try:
        return socket.create_server((host, port))
    except OSError as err:
        raise OSError(err.errno, f"serve: cannot listen on {host}:{port} ({err.strerror}); "
                                 "is another server running there? choose another --port") from None


async def serve(
    policy: ServerPolicy,
    metadata: Mapping,
    host: str,
    port: int,
    stop: asyncio.Event,
    on_ready: Callable[[int], None] = lambda port: None,
    sock: socket.socket | None = None,
) -> None:
    """Serve until `stop` is set; `on_ready(port)` once listening (port 0 picks a free one). `sock`:
    an already bound socket (`bind`) to serve on instead of host:port."""
    import websockets.asyncio.server

    handler = functools.partial(_connection, policy=policy, metadata=metadata)
    where = dict(sock=sock) if sock is not None else dict(host=host, port=port)
    async with websockets.asyncio.server.serve(
        handler, **where, compression=None, max_size=MAX_MESSAGE_BYTES, process_request=_health
    ) as server:
        on_ready(server.sockets[0].getsockname()[1])
        await stop.wait()


@contextlib.contextmanager
def running(policy: ServerPolicy, metadata: Mapping | None = None, host: str = "127.0.0.1", port: int = 0) -> Iterator[int]:
    """The server in a background thread for the duration of the block; yields its port."""
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    started = threading.Event()
    bound: list[int] = []
    failure: list[BaseException] = []

    def on_ready(p: int) -> None:
        bound.append(p)
        started.set()

    def main() -> None:
        try:
            loop.run_until_complete(serve(policy, metadata or {}, host, port, stop, on_ready))
        except BaseException as err:  # noqa: BLE001 - handed to the caller below
            failure.append(err)
            started.set()

    thread = threading.Thread(target=main, name="eqx_pi05.serve", daemon=True)
    thread.start()
    started.wait(timeout=60)
    if failure or not bound:
        thread.join(timeout=5)
        raise RuntimeError(f"policy server on {host}:{port} did not start") from (failure[0] if failure else None)
    try:
        yield bound[0]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=30)
        if not thread.is_alive():
            loop.close()


def audit_observation() -> dict:
    """A LIBERO request (random 224×224 images, zero state) for the start-up removal audit."""
    from eqx_pi05.eval.rollout import POLICY_RESOLUTION, policy_observation
    from eqx_pi05.eval.sim import SimObservation

    rng = np.random.default_rng(0)
    size = (POLICY_RESOLUTION, POLICY_RESOLUTION, 3)
    frame = SimObservation(agentview=rng.integers(0, 256, size, dtype=np.uint8), wrist=rng.integers(0, 256, size, dtype=np.uint8), state=np.zeros(LIBERO_STATE_DIM))
    return policy_observation(frame, "pick up the black bowl and place it on the plate", seed=0)


def load(
    checkpoint: pathlib.Path,
    params: Literal["ema", "params"] = "ema",
    eval_view: Literal["deployed", "real"] = "deployed",
    assets_from_config: bool = False,
) -> tuple[ServerPolicy, dict]:
    """The checkpoint's evaluation policy (its variant's eval-time camera removal, `eval_view` for
    view_dropout variants), audited; + metadata."""
    from eqx_pi05.eval.audit import audit_removal
    from eqx_pi05.eval.policy import load_policy

    policy, info = load_policy(checkpoint, params=params, batch_size=1, eval_view=eval_view,
                               assets_from_config=assets_from_config)
    line = audit_removal(policy, audit_observation(), info.view_remove_eval, info.view_dropout_train, info.view_dropout_eval)
    log.info(line)
    metadata = {
        "server": "eqx_pi05",
        "checkpoint": str(checkpoint),
        "params": params,
        "variant": info.variant,
        "mechanism": info.mechanism,
        "eval_view": info.eval_view,
        "camera_removal": line,
        "assets": info.assets,
    }
    return from_batched(policy), metadata


@dataclasses.dataclass(frozen=True)
class Args:
    checkpoint: pathlib.Path
    """Checkpoint directory written by train.py (as evaluate.py takes it)."""
    port: int = 8000
    host: str = "127.0.0.1"
    """Loopback by default; give 0.0.0.0 to serve a robot on another machine."""
    params: Literal["ema", "params"] = "ema"
    """Which weights: the EMA (default, as openpi serves) or the raw params."""
    eval_view: Literal["deployed", "real"] = "deployed"
    """A view_dropout variant's camera it was trained without: zeros with mask True (deployed) or the client's frame (real)."""
    assets_from_config: bool = False
    """Old checkpoints without stored norm stats/tokenizer: read the files their config names."""
    verbose: bool = False
    """Show the libraries' INFO logs (absl, orbax); by default one line per phase and per connection."""


def main(args: Args) -> None:
    from eqx_pi05 import preflight

    # The arguments first (the port is free, the checkpoint's inputs are there), then the model (~13 s).
    sock = bind(args.host, args.port)
    preflight.exit_if_missing(preflight.checkpoint_inputs(args.checkpoint, assets_from_config=args.assets_from_config),
                              "python -m eqx_pi05.serve")
    log.info("loading %s and compiling the policy", args.checkpoint)
    policy, metadata = load(args.checkpoint, args.params, args.eval_view, args.assets_from_config)
    asyncio.run(serve(policy, metadata, args.host, args.port, asyncio.Event(),
                      lambda port: log.info("serving %s on ws://%s:%d", args.checkpoint, args.host, port), sock=sock))


if __name__ == "__main__":
    import sys

    import tyro

    from eqx_pi05.logs import setup_logging

    cli = tyro.cli(Args)
    setup_logging(cli.verbose)
    try:
        main(cli)
    except (OSError, ValueError) as err:  # a busy port, a corrupt checkpoint: named, no traceback
        if cli.verbose:
            raise
        sys.exit(f"serve: {err}")
