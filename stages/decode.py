"""Decode: downloaded bytes -> a safe, upright, 8-bit RGB JPEG at the size SAM wants.

Written by hand because img2dataset's resizer decodes with OpenCV *before* it checks the pixel
limit and ignores EXIF orientation. Here the pixel count is read from the header and refused
before any pixel is decoded (decompression bombs), EXIF rotation is applied, and every PIL mode
(CMYK, grayscale, 16-bit, float, alpha, palette) is converted explicitly.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from pydantic import Field

from ssam.configio import Section

from .common import ROW_COLUMNS, RowFailure, Stage, map_rows

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is a failure, not a grey half-image
Image.MAX_IMAGE_PIXELS = None  # our own limit (checked from the header) is the one that applies


def _to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; alpha is composited over ``background``."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "PA", "RGBA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGB


def decode_image(data: bytes, max_pixels: int, min_side: int, longest_side: int) -> Image.Image:
    """Decode untrusted image bytes into an upright RGB image no longer than ``longest_side``.

    Raises:
        RowFailure: ``decode_failed`` (not an image, truncated, empty),
            ``decompression_bomb`` (header says more than ``max_pixels``),
            ``image_too_small`` (shorter side under ``min_side`` after decoding).
    """
    if not data:
        raise RowFailure("decode_failed", "0-byte file")
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except (UnidentifiedImageError, OSError, ValueError) as e:
        head = data[:15].lower()
        what = "HTML page" if head.lstrip().startswith((b"<!doctype", b"<html")) else "not an image"
        raise RowFailure("decode_failed", f"{what}: {e}") from e
    w, h = img.size
    if w * h > max_pixels:
        raise RowFailure("decompression_bomb", f"{w}x{h} = {w * h} pixels > limit {max_pixels}")
    try:
        if img.format == "JPEG":
            img.draft("RGB", (longest_side, longest_side))  # DCT-domain downscale: faster, less memory
        img.load()
        img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
    except (OSError, ValueError, SyntaxError) as e:
        raise RowFailure("decode_failed", f"{type(e).__name__}: {e}") from e
    if max(img.size) > longest_side:
        img.thumbnail((longest_side, longest_side), Image.Resampling.LANCZOS)
    if min(img.size) < min_side:
        raise RowFailure("image_too_small", f"{img.size[0]}x{img.size[1]}, shorter side < {min_side}")
    return img


def _dct_matrix(n: int) -> np.ndarray:
    """The (unnormalised) DCT-II as an ``n x n`` matrix: ``coeffs = D @ x``."""
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    return 2.0 * np.cos(np.pi * k * (2 * i + 1) / (2 * n))


_DCT32 = _dct_matrix(32)


def image_phash(img: Image.Image) -> str:
    """64-bit DCT perceptual hash of an image, as 16 lowercase hex digits.

    The classic pHash (the definition ``imagehash.phash`` uses): grayscale, 32x32 Lanczos, 2-D
    DCT-II, the 8x8 lowest frequencies compared with their median; bit ``r*8+c`` (row-major, most
    significant first) is 1 where coefficient ``(r, c)`` is above it. Re-encoding, resizing and
    mild colour changes move a few bits; different photos differ in ~32 (stages/dedup.py).
    """
    small = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.LANCZOS), np.float64)
    low_8x8 = (_DCT32 @ small @ _DCT32.T)[:8, :8]
    bits = (low_8x8 > np.median(low_8x8)).ravel()
    return f"{int(np.packbits(bits).view('>u8')[0]):016x}"


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


class DecodeConfig(Section):
    """``decode:`` what the decoder accepts and what it stores."""

    image_size: int = Field(
        1024,
        ge=64,
        le=8192,
        description="longest side of the stored image (SAM's input side; also img2dataset's resize)",
    )
    max_pixels: int = Field(
        64_000_000, ge=1, description="refuse images whose header declares more pixels (decompression bombs)"
    )
    min_image_side: int = Field(32, ge=1, description="fail decoded images whose shorter side is below this")
    jpeg_quality: int = Field(92, ge=50, le=100, description="quality of the stored JPEG")


class DecodeStage(Stage):
    """Bytes (column ``image``) -> ``jpeg``, ``width``, ``height``, ``phash`` (of the stored
    image, :func:`image_phash`); the raw bytes are dropped."""

    name = "decode"
    reads = (*ROW_COLUMNS, "image")
    writes = ("jpeg", "width", "height", "phash")
    drops = ("image",)

    def __init__(self, cfg: DecodeConfig):
        self.cfg = cfg

    def process(self, out: dict[str, list]) -> None:
        raw = out.pop("image")
        c = self.cfg

        def one(i):
            img = decode_image(raw[i] or b"", c.max_pixels, c.min_image_side, c.image_size)
            w, h = img.size
            return {
                "jpeg": encode_jpeg(img, c.jpeg_quality),
                "width": w,
                "height": h,
                "phash": image_phash(img),
            }

        map_rows(out, self.name, one, {"jpeg": b"", "width": 0, "height": 0, "phash": ""})
