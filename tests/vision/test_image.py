"""Pictures in: the same pixels as training, and one-line errors for what is not a usable picture."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from camelid import CamelidError
from camelid.vision.data import random_scene
from camelid.vision.image import MAX_PIXELS, load_image, open_image, to_pixels


def test_a_saved_scene_loads_to_the_pixels_training_used(tmp_path: Path) -> None:
    picture = random_scene(np.random.default_rng(3)).render(48)
    picture.save(tmp_path / "scene.png")
    pixels = load_image(tmp_path / "scene.png", 48)
    assert torch.equal(pixels, to_pixels(picture))
    assert pixels.shape == (1, 3, 48, 48) and pixels.min() >= -1 and pixels.max() <= 1
    assert torch.equal(load_image((tmp_path / "scene.png").read_bytes(), 48), pixels)


def test_other_sizes_modes_and_aspect_ratios_are_fitted(tmp_path: Path) -> None:
    Image.new("RGBA", (300, 100), (255, 0, 0, 128)).save(tmp_path / "wide.png")
    Image.new("L", (20, 20), 200).save(tmp_path / "grey.gif")
    wide = open_image(tmp_path / "wide.png", 48)
    assert wide.size == (48, 48) and wide.getpixel((24, 24))[0] > 200 and wide.getpixel((24, 2)) == (0, 0, 0)
    assert open_image(tmp_path / "grey.gif", 48).getpixel((10, 10)) == (200, 200, 200)


def test_a_large_jpeg_is_decoded_at_reduced_scale(tmp_path: Path) -> None:
    Image.new("RGB", (4000, 3000), (10, 200, 30)).save(tmp_path / "big.jpg", quality=80)
    with Image.open(tmp_path / "big.jpg") as im:
        im.draft("RGB", (48, 48))
        assert im.size == (500, 375)  # what open_image decodes: 1/8 of the pixels on each side
    pixels = load_image(tmp_path / "big.jpg", 48)
    assert pixels.shape == (1, 3, 48, 48)


def huge_png(path: Path, width: int, height: int) -> None:
    """A valid PNG of width x height black pixels, written row by row (the file is small, the picture is not)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z, row = zlib.compressobj(9), b"\0" * (width + 1)  # grayscale, filter byte + pixels
    data = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def test_bad_pictures_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a picture\n")
    huge_png(tmp_path / "huge.png", 20000, 20000)  # 400 megapixels: refused before decoding
    huge_png(tmp_path / "large.png", 9000, 5000)  # 45: refused by camelid's own limit
    assert 9000 * 5000 > MAX_PIXELS and (tmp_path / "huge.png").stat().st_size < 1_000_000
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:60])
    cases = {tmp_path / "notes.txt": "not a picture", tmp_path / "huge.png": "more than 40 megapixels",
             tmp_path / "large.png": "9000x5000 pixels",
             tmp_path / "missing.png": "no such image file", tmp_path / "cut.png": "damaged or truncated"}
    for path, message in cases.items():
        with pytest.raises(CamelidError, match=message) as e:
            load_image(path, 48)
        assert "\n" not in str(e.value)
    with pytest.raises(CamelidError, match="not a picture"):
        load_image(b"\x00\x01", 48)
