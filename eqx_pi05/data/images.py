"""Image decoding and resizing, on uint8 HWC numpy arrays."""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
from jaxtyping import UInt8


def decode_image(data: bytes) -> UInt8[np.ndarray, "h w 3"]:
    """PNG/JPEG bytes -> uint8 RGB. Raises ValueError (callers add where the bytes came from)."""
    try:
        with PIL.Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB") if image.mode != "RGB" else image
            return np.asarray(image)
    except (OSError, SyntaxError, ValueError) as err:  # PIL raises all three for corrupt data
        raise ValueError(f"undecodable image ({len(data)} bytes): {err}") from None


def to_uint8_hwc(image: np.ndarray) -> UInt8[np.ndarray, "h w 3"]:
    """Accept LeRobot's float CHW in [0, 1] as well as uint8 HWC, as openpi's `_parse_image` does.

    The float -> uint8 conversion truncates (255·x), like the reference.
    """
    image = np.asarray(image)
    if np.issubdtype(image.dtype, np.floating):
        image = (255 * image).astype(np.uint8)
    if image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
        image = np.transpose(image, (1, 2, 0))
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image: expected uint8 (h, w, 3) or float (3, h, w), got {image.dtype} {image.shape}")
    return image


def resize_with_pad(image: UInt8[np.ndarray, "h w 3"], height: int, width: int) -> UInt8[np.ndarray, "out_h out_w 3"]:
    """Aspect-preserving PIL bilinear resize, zero padding centred (openpi_client.image_tools).

    An image already at the target size is returned unchanged; 256x256 -> 224x224 is a plain resize.
    """
    cur_height, cur_width = image.shape[:2]
    if (cur_height, cur_width) == (height, width):
        return image
    if not image.any():  # a removed or dropped camera: skip the resize, the result is zeros anyway
        return np.zeros((height, width, 3), np.uint8)
    ratio = max(cur_width / width, cur_height / height)
    resized_height, resized_width = int(cur_height / ratio), int(cur_width / ratio)
    resized = PIL.Image.fromarray(image).resize((resized_width, resized_height), resample=PIL.Image.BILINEAR)
    out = np.zeros((height, width, 3), np.uint8)
    top, left = max(0, (height - resized_height) // 2), max(0, (width - resized_width) // 2)
    out[top : top + resized_height, left : left + resized_width] = np.asarray(resized)
    return out
