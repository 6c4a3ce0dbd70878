"""The one check of an RGB image given to a model (documented dtypes and ranges only), and the one
decoder of image files received over the network (the app and the annotation-tool backends)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# Float images may exceed [0, 1] by this much (rounding in resizes / colour conversions).
FLOAT_TOLERANCE = 1e-3


def as_float_image(image, what: str = "image") -> np.ndarray:
    """[H, W, 3] uint8 in 0..255 or floating in 0..1 -> float32 [H, W, 3] in [0, 1].

    Raises ValueError naming `what` for another shape, an empty image, another dtype (uint16,
    int32, bool, ...), a float image outside 0..1 (e.g. 0..255) or NaN/inf pixels, with how to
    convert it.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{what} must be [H, W, 3] RGB, got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{what} is empty (shape {image.shape})")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / np.float32(255)
    if not np.issubdtype(image.dtype, np.floating) and image.dtype.name != "bfloat16":
        hint = ("for 16-bit images use (image / 65535).astype(np.float32); " if image.dtype == np.uint16
                else "")
        raise ValueError(
            f"{what} has dtype {image.dtype}; expected uint8 in 0..255 or float in 0..1 ({hint}for "
            "integer values in 0..255 use image.astype(np.uint8))")
    image = image.astype(np.float32)
    finite = np.isfinite(image)
    if not finite.all():
        bad = np.argwhere(~finite.all(axis=-1))[0]
        raise ValueError(f"{what} has {int((~finite).sum())} NaN/inf values (first at pixel "
                         f"{tuple(int(i) for i in bad)}); clean them before segmenting")
    lo, hi = float(image.min()), float(image.max())
    if lo < -FLOAT_TOLERANCE or hi > 1 + FLOAT_TOLERANCE:
        hint = ("it looks like 0..255: pass image.astype(np.uint8) or image / 255"
                if 2 < hi <= 255 + FLOAT_TOLERANCE and lo >= -FLOAT_TOLERANCE
                else "rescale or clip it to 0..1 (np.clip(image, 0, 1))")
        raise ValueError(f"float {what} has values in [{lo:g}, {hi:g}], expected 0..1; {hint}")
    return np.clip(image, 0.0, 1.0)


class ImageDecodeError(ValueError):
    """Bytes that are not a usable image; `too_large` marks a size limit (HTTP 413) apart from a
    bad file."""

    def __init__(self, message: str, too_large: bool = False):
        super().__init__(message)
        self.too_large = too_large


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, WebP, ...) -> uint8 [H, W, 3] RGB.

    Raises ImageDecodeError for empty bytes, an unrecognised or corrupt file, a zero-sized image,
    or more than `max_pixels` pixels (checked from the header, before the pixels are decoded).
    """
    if not data:
        raise ImageDecodeError("empty upload: the file has zero bytes")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageDecodeError(f"image too large: {w}x{h} pixels, the limit is {max_pixels:,}",
                                       too_large=True)
            if w == 0 or h == 0:
                raise ImageDecodeError(f"image is zero-sized ({w}x{h})")
            return np.asarray(im.convert("RGB"))
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:  # PIL's own pixel limit
        raise ImageDecodeError(f"image too large: {e}", too_large=True) from e
    except Image.UnidentifiedImageError as e:
        raise ImageDecodeError("not an image: the file format is not recognised (PNG, JPEG, WebP, "
                               "... expected)") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageDecodeError(f"not a readable image ({type(e).__name__}: {e})") from e
