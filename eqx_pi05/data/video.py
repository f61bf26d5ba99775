"""One frame out of an mp4 (LeRobot video features), with PyAV imported only when a video is read."""

from __future__ import annotations

import pathlib

import numpy as np
from jaxtyping import UInt8


def decode_frame(path: pathlib.Path, timestamp: float, tolerance: float) -> UInt8[np.ndarray, "h w 3"]:
    """The frame whose presentation time is closest to `timestamp` (seconds), within `tolerance`."""
    try:
        import av
    except ImportError:
        raise ImportError(
            f"{path}: reading LeRobot video features needs PyAV; install it with `pip install av` "
            "(it is in eqx-pi05's `libero` extra)"
        ) from None
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        # Seek lands on the keyframe at or before the target; decode forward from there.
        container.seek(max(0, int((timestamp - tolerance) / stream.time_base)), stream=stream, backward=True)
        best, best_gap = None, float("inf")
        for frame in container.decode(stream):
            t = float(frame.pts * stream.time_base)
            gap = abs(t - timestamp)
            if gap < best_gap:
                best, best_gap = frame, gap
            if t > timestamp + tolerance:
                break
    if best is None or best_gap > tolerance:
        found = "no frame" if best is None else f"closest frame {best_gap:.4f} s away"
        raise ValueError(f"{path}: expected a frame at {timestamp:.4f} s (tolerance {tolerance:.4f} s), {found}")
    return best.to_ndarray(format="rgb24")
