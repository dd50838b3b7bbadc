"""Real image files, good and bad, made in memory for the tests (no downloads)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image
from skimage import data


def photo(size: int = 320) -> Image.Image:
    """A real photo (scikit-image's astronaut), RGB, longest side ``size``."""
    img = Image.fromarray(data.astronaut())
    img.thumbnail((size, size))
    return img


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def jpeg(size: int = 320) -> bytes:
    return encode(photo(size), "JPEG", quality=90)


def cmyk_jpeg() -> bytes:
    return encode(photo(200).convert("CMYK"), "JPEG", quality=90)


def gray_png() -> bytes:
    return encode(Image.fromarray(data.camera()).resize((200, 200)), "PNG")


def png16() -> bytes:
    """16-bit grayscale PNG: a horizontal ramp 0..65535."""
    ramp = np.tile(np.linspace(0, 65535, 128, dtype=np.uint16), (96, 1))
    return encode(Image.fromarray(ramp), "PNG")  # uint16 array -> mode I;16


def rgba_png() -> bytes:
    """Red square, left half opaque, right half fully transparent."""
    arr = np.zeros((64, 64, 4), np.uint8)
    arr[..., 0] = 255
    arr[:, :32, 3] = 255
    return encode(Image.fromarray(arr, "RGBA"), "PNG")


def palette_png() -> bytes:
    img = photo(120).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    img.info["transparency"] = 0
    return encode(img, "PNG", transparency=0)


def exif_rotated_jpeg() -> bytes:
    """A 80x40 (w x h) JPEG, left half black, tagged Orientation=6 (display rotated 90 deg CW)."""
    arr = np.full((40, 80, 3), 255, np.uint8)
    arr[:, :40] = 0
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6
    return encode(img, "JPEG", exif=exif.tobytes(), quality=95)


def truncated_jpeg() -> bytes:
    full = jpeg()
    return full[: len(full) // 3]


def html_page() -> bytes:
    return b"<!DOCTYPE html><html><body>Not found</body></html>"


def bomb_png(side: int = 40_000) -> bytes:
    """A PNG whose header declares ``side`` x ``side`` pixels (1.6 gigapixels) over a tiny body.

    Refusing it from the header is the only safe answer: decoding would need gigabytes.
    """
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)  # noqa: E731
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + chunk(b"IEND", b"")
    )
