"""Start-up check of train.py, evaluate.py and serve: every missing input listed at once.

Each entry point calls one function here before it builds anything: `train_inputs` (dataset, norm
stats, tokenizer, weights, a checkpoint teacher), `checkpoint_inputs` (a train.py checkpoint and the
tokenizer and norm stats its config names; for evaluate.py also the simulator extra and MUJOCO_GL).
They return what is missing, each with the path it was expected at and the command that gets it;
`exit_if_missing` prints that list and exits with status 2, without a traceback.

Remote inputs go through the libraries that read them: a `gs://` weights path is handed to orbax
unchanged (it reads through etils.epath, which needs gcsfs), and a dataset given as a Hugging Face
dataset id (`physical-intelligence/libero`) is `huggingface_hub.snapshot_download`ed into the hub cache.
"""

from __future__ import annotations

import ctypes.util
import dataclasses
import importlib.util
import os
import pathlib
import sys

from eqx_pi05.data import hub
from eqx_pi05.data.data_config import DataConfig
from eqx_pi05.variants import TrainConfig

LIBERO_DATASET = "physical-intelligence/libero"
TOKENIZER_URL = "gs://big_vision/paligemma_tokenizer.model"
PI05_BASE_URL = "gs://openpi-assets/checkpoints/pi05_base"


@dataclasses.dataclass(frozen=True)
class Missing:
    what: str  # the input and the flag that sets it: "tokenizer (--data.tokenizer)"
    expected: str  # where it was looked for, and what was found there if anything
    fix: str  # the command (or step) that gets it


def is_remote(path: str | os.PathLike) -> bool:
    """A URL (gs://, s3://, ...) rather than a local path."""
    return "://" in str(path)


def is_remote(path: str | os.PathLike) -> bool:
    """A URL (gs://, s3://, ...) rather than a local path."""
    return "://" in str(path)


def _dataset(path: pathlib.Path, flag: str) -> list[Missing]:
    if not path.exists():
        return [Missing(f"dataset ({flag})", f"{path}: no such directory",
                        f"hf download {LIBERO_DATASET} --repo-type dataset --local-dir {path}"
                        f"   (or give the hub id: {flag} {LIBERO_DATASET})")]
    if not (path / "meta" / "info.json").is_file():
        return [Missing(f"dataset ({flag})", f"{path}/meta/info.json: not there, so {path} is not a LeRobot dataset",
                        f"hf download {LIBERO_DATASET} --repo-type dataset --local-dir {path}")]
    return []


def _file(path: pathlib.Path, what: str, fix: str) -> list[Missing]:
    return [] if path.is_file() else [Missing(what, f"{path}: no such file", fix)]


def _tokenizer(path: pathlib.Path, flag: str) -> list[Missing]:
    return _file(path, f"tokenizer ({flag})", f"gsutil cp {TOKENIZER_URL} {path}")


def _norm_stats(data: DataConfig, flag: str) -> list[Missing]:
    """The stats of the episodes `data` selects: the command takes the same --suites / --tasks."""
    select = "".join([f" --suites {' '.join(data.suites)}" if data.suites else "",
                      " --tasks " + " ".join(repr(t) for t in data.tasks) if data.tasks else ""])
    path = pathlib.Path(data.norm_stats)
    return _file(path, f"norm stats ({flag})", f"python -m eqx_pi05.data.norm_stats {data.dataset}{select} --output {path}")


def _params(path: str | os.PathLike, what: str, fix: str) -> list[Missing]:
    """Weights: an openpi params directory or a URL orbax reads (gs:// through gcsfs), or a LeRobot
    model.safetensors (a file, or a directory holding one)."""
    if is_remote(path):
        if str(path).startswith("gs://") and not any(importlib.util.find_spec(m) for m in ("gcsfs", "tensorflow")):
            return [Missing(what, f"{path}: reading gs:// needs gcsfs (or tensorflow), neither is installed",
                            "pip install gcsfs   (and `gcloud auth application-default login` for private buckets)")]
        return []  # checked when orbax opens it: there is no offline way to look
    local = pathlib.Path(path)
    if local.is_dir() or (local.suffix == ".safetensors" and local.is_file()):
        return []
    return [Missing(what, f"{path}: no such directory", fix)]


def _has_checkpoint(run_dir: pathlib.Path) -> bool:
    root = run_dir / "checkpoints"
    return root.is_dir() and any(p.name.isdigit() for p in root.iterdir())


def train_inputs(cfg: TrainConfig) -> tuple[TrainConfig, list[Missing]]:
    """What `cfg` reads that is not there; and `cfg` with a hub dataset id replaced by its local
    snapshot (downloaded only when nothing else is missing, so a failing start costs no download)."""
    data, missing = cfg.data, []
    dataset, hub_id = pathlib.Path(data.dataset), None
    if hub.is_hub_id(dataset):
        hub_id, snapshot = str(dataset), hub.cached(str(dataset))
        if snapshot is not None:
            dataset, hub_id = snapshot, None
        elif hub.offline():
            missing.append(Missing("dataset (--data.dataset)",
                                   f"Hugging Face dataset {hub_id}: not in the hub cache, and HF_HUB_OFFLINE is set",
                                   f"hf download {hub_id} --repo-type dataset   (with network), then rerun"))
    else:
        missing += _dataset(dataset, "--data.dataset")
    missing += _norm_stats(data, "--data.norm-stats")
    missing += _tokenizer(pathlib.Path(data.tokenizer), "--data.tokenizer")
    if cfg.weights is not None and not (cfg.resume and _has_checkpoint(cfg.run_dir)):
        missing += _params(cfg.weights, "weights (--weights)",
                           f"gsutil -m cp -r {PI05_BASE_URL} {pathlib.Path(cfg.weights).parent.parent}/   "
                           f"(or --weights {PI05_BASE_URL}/params, or --weights None for a random init)")
    d = cfg.distill
    if d is not None and d.teacher_checkpoint is not None:
        missing += _params(d.teacher_checkpoint, "teacher checkpoint (--distill.teacher-checkpoint)",
                           "a train.py run directory or an openpi params directory")
    if hub_id is not None and not missing:
        dataset = hub.resolve(hub_id)
    return dataclasses.replace(cfg, data=dataclasses.replace(data, dataset=dataset)), missing


def checkpoint_inputs(checkpoint: pathlib.Path, simulator: bool = False, assets_from_config: bool = False) -> list[Missing]:
    """What evaluating (`simulator=True`) or serving a train.py checkpoint needs that is not there.
    Its norm stats and tokenizer are in the checkpoint (`assets`); the files its config names are
    read only for an older checkpoint without them, with `assets_from_config`."""
    from eqx_pi05.checkpoints import read_config, step_dir  # noqa: PLC0415 - orbax only here

    missing = []
    try:
        directory = step_dir(checkpoint)
        cfg = read_config(directory)
    except FileNotFoundError as e:
        missing.append(Missing("checkpoint (--checkpoint)", str(e),
                               "python train.py --variant NAME [--preset demo]   (writes outputs/NAME[_demo]/checkpoints/<step>/)"))
    else:
        if (directory / "assets").is_dir():
            pass
        elif not assets_from_config:
            missing.append(Missing("norm stats and tokenizer in the checkpoint", f"{directory}/assets: not there "
                                   "(written before train.py stored them)", "pass --assets-from-config to read the "
                                   "files its config names (they must be the ones it was trained with)"))
        else:  # relative paths in the run's config are read from the current directory, as train.py read them
            missing += _norm_stats(cfg.data, "in the checkpoint's config")
            missing += _tokenizer(pathlib.Path(cfg.data.tokenizer), "in the checkpoint's config")
    if simulator:
        missing += simulator_inputs()
    return missing


def simulator_inputs() -> list[Missing]:
    """The `libero` extra, and a MuJoCo rendering backend that can load (MUJOCO_GL, egl by default)."""
    missing = []
    absent = [m for m in ("libero", "robosuite", "mujoco") if importlib.util.find_spec(m) is None]
    if absent:
        missing.append(Missing("LIBERO simulator (the libero extra)", f"python modules {absent} not importable",
                               "pip install -e \".[libero]\""))
    backend = os.environ.get("MUJOCO_GL", "egl")
    library = {"egl": "EGL", "osmesa": "OSMesa", "glfw": "glfw"}.get(backend)
    if library is None:
        missing.append(Missing("MUJOCO_GL", f"MUJOCO_GL={backend!r}: expected egl, osmesa or glfw",
                               "export MUJOCO_GL=egl   (headless; osmesa: software rendering)"))
    elif ctypes.util.find_library(library) is None:
        package = {"egl": "libegl1", "osmesa": "libosmesa6", "glfw": "libglfw3"}[backend]
        missing.append(Missing("MUJOCO_GL", f"MUJOCO_GL={backend}: lib{library} not found",
                               f"apt-get install {package}   (or another backend: export MUJOCO_GL=egl|osmesa)"))
    elif backend == "glfw" and not os.environ.get("DISPLAY"):
        missing.append(Missing("MUJOCO_GL", "MUJOCO_GL=glfw needs a display, DISPLAY is not set",
                               "export MUJOCO_GL=egl   (headless rendering)"))
    return missing


def exit_if_missing(missing: list[Missing], command: str, hint: str = "") -> None:
    """Print every missing input with its fix and exit with status 2 (a usage error), no traceback."""
    if not missing:
        return
    lines = [f"{command}: {len(missing)} input(s) missing; nothing was started or written:"]
    for m in missing:
        lines += [f"  - {m.what}", f"      expected: {m.expected}", f"      get it:   {m.fix}"]
    if hint:
        lines.append(hint)
    print("\n".join(lines), file=sys.stderr)
    sys.exit(2)
