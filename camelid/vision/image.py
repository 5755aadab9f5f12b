"""Pictures in: any file Pillow reads -> the pixel tensor a vision model takes, with bounded memory.

A JPEG is decoded at a reduced scale straight away (Pillow's draft mode: the decoder skips the detail), so even a
very large photograph costs little memory; other formats are decoded whole and are refused above MAX_PIXELS.
The picture is then fitted into a square (aspect kept, black borders) of the encoder's size.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from camelid.errors import CamelidError

MAX_PIXELS = 40_000_000  # decoded pixels (after draft mode) a picture may have: 120 MB as RGB

ImageSource = str | os.PathLike | bytes | Image.Image


def to_pixels(image: Image.Image) -> Tensor:
    """An RGB picture -> [1, 3, H, W] float32 in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float().div_(127.5).sub_(1.0)


def open_image(source: ImageSource, size: int) -> Image.Image:
    """The picture as RGB, fitted into size x size; any problem is a one-line CamelidError."""
    if isinstance(source, Image.Image):
        return _fit(source, size)
    name = "the image bytes" if isinstance(source, bytes) else str(source)
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise CamelidError(f"{name}: no such image file; give the path of a PNG, JPEG or other picture")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_PIXELS below is the limit
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        with image:
            image.draft("RGB", (size, size))  # JPEG: decode at 1/2, 1/4 or 1/8 scale (no-op for other formats)
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise CamelidError(f"{name}: the picture is {width}x{height} pixels, more than camelid decodes "
                                   f"({MAX_PIXELS // 1_000_000} megapixels); shrink it first (or save it as JPEG)")
            image.load()
            return _fit(image, size)
    except Image.DecompressionBombError:  # Pillow's own limit, far above ours: refused before decoding too
        raise CamelidError(f"{name}: the picture has more than {MAX_PIXELS // 1_000_000} megapixels, more than "
                           "camelid decodes; shrink it first (or save it as JPEG)") from None
    except UnidentifiedImageError:
        raise CamelidError(f"{name}: not a picture Pillow can read; give a PNG, JPEG, GIF, BMP or WebP file") from None
    except OSError as e:  # a truncated or damaged file
        raise CamelidError(f"{name}: the picture cannot be decoded ({' '.join(str(e).split())}); "
                           "the file is damaged or truncated") from None


def _fit(image: Image.Image, size: int) -> Image.Image:
    image = image.convert("RGB")
    if image.size == (size, size):
        return image
    return ImageOps.pad(image, (size, size), method=Image.Resampling.BICUBIC, color=(0, 0, 0))


def load_image(source: ImageSource, size: int) -> Tensor:
    """A picture (path, bytes or PIL image) -> pixels [1, 3, size, size] in [-1, 1] for a vision model."""
    return to_pixels(open_image(source, size))
