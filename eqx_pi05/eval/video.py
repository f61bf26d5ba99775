"""MP4 of an episode: agentview | wrist side by side, a camera the policy does not see greyed out."""

from __future__ import annotations

import logging
import pathlib
import re
from collections.abc import Collection, Sequence

import numpy as np
from jaxtyping import UInt8

from eqx_pi05.cameras import CAMERAS
from eqx_pi05.eval.sim import SimObservation

FPS = 10  # as the reference's replay videos
_NAME = re.compile(r"task(\d+)_trial(\d+)_(success|failure|partial)\.mp4")

log = logging.getLogger(__name__)


def grey(image: UInt8[np.ndarray, "h w 3"]) -> UInt8[np.ndarray, "h w 3"]:
    """Dimmed luminance: the scene stays readable, and obviously not what the policy saw."""
    luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.repeat((64 + 0.35 * luma).astype(np.uint8)[..., None], 3, axis=-1)


def frame(obs: SimObservation, greyed: Sequence[str]) -> UInt8[np.ndarray, "h w2 3"]:
    views = [grey(obs[c]) if c in greyed else obs[c] for c in CAMERAS]
    return np.concatenate(views, axis=1)


class EpisodeVideo:
    """Frames are encoded as they come (no episode held in memory); `finish` names the file by outcome."""

    def __init__(self, stem: pathlib.Path, greyed: Sequence[str]):
        import imageio.v3 as iio  # noqa: PLC0415 - the `libero` extra

        self.stem, self.greyed = pathlib.Path(stem), tuple(greyed)
        self.stem.parent.mkdir(parents=True, exist_ok=True)
        self._partial = self.stem.with_name(self.stem.name + ".partial.mp4")
        self._file = iio.imopen(self._partial, "w", plugin="pyav")
        self._file.init_video_stream("libx264", fps=FPS)

    def add(self, obs: SimObservation) -> None:
        self._file.write_frame(frame(obs, self.greyed))

    def finish(self, success: bool) -> pathlib.Path:
        self._file.close()
        path = self.stem.with_name(f"{self.stem.name}_{'success' if success else 'failure'}.mp4")
        self._partial.replace(path)
        return path


def stem(directory: pathlib.Path, task: int, trial: int) -> pathlib.Path:
    return pathlib.Path(directory) / f"task{task:02d}_trial{trial:02d}"


def remove_orphans(directory: pathlib.Path, done: Collection[tuple[int, int]]) -> list[pathlib.Path]:
    """Delete videos of episodes without a record (task, trial) in `done`: a run killed between an
    episode's end and its record, or during the episode (a .partial.mp4). The rerun records them anew."""
    removed = []
    for path in sorted(pathlib.Path(directory).glob("task*_trial*.mp4")):
        match = _NAME.fullmatch(path.name.replace(".partial.mp4", "_partial.mp4"))
        if match and (match[3] == "partial" or (int(match[1]), int(match[2])) not in done):
            path.unlink()
            removed.append(path)
    if removed:
        log.info("removed %d video(s) of episodes with no record (the last run was killed): %s", len(removed),
                 ", ".join(p.name for p in removed))
    return removed
