import io

import imagefiles
import numpy as np
import pytest
from PIL import Image

from ssam.stages.common import RowFailure
from ssam.stages.decode import DecodeStage, decode_image


def dec(data, max_pixels=50_000_000, min_side=8, longest=256):
    return decode_image(data, max_pixels, min_side, longest)


def test_photo_is_resized_to_longest_side():
    img = dec(imagefiles.jpeg(400), longest=256)
    assert img.mode == "RGB" and max(img.size) == 256


def test_cmyk_jpeg_becomes_rgb_with_the_same_colours():
    img = dec(imagefiles.cmyk_jpeg())
    ref = dec(imagefiles.jpeg(200))
    assert img.mode == "RGB" and img.size == ref.size
    diff = np.abs(np.asarray(img, np.float32) - np.asarray(ref, np.float32)).mean()
    assert diff < 12, diff  # CMYK round trip: same picture, small error


def test_sixteen_bit_is_scaled_not_clipped():
    arr = np.asarray(dec(imagefiles.png16(), longest=512))
    assert arr.shape == (96, 128, 3)
    assert arr[:, 0].max() <= 1 and arr[:, -1].min() >= 254  # the full 16-bit range maps onto 0..255
    assert 100 < arr[:, 64].mean() < 155


def test_alpha_is_composited_on_white_and_grayscale_and_palette_become_rgb():
    arr = np.asarray(dec(imagefiles.rgba_png()))
    assert tuple(arr[10, 5]) == (255, 0, 0) and tuple(arr[10, 60]) == (255, 255, 255)
    assert dec(imagefiles.gray_png()).mode == "RGB"
    assert dec(imagefiles.palette_png()).mode == "RGB"


def test_exif_rotation_is_applied():
    img = dec(imagefiles.exif_rotated_jpeg())
    assert img.size == (40, 80)  # stored 80x40, Orientation=6 -> displayed 40 wide, 80 tall
    arr = np.asarray(img)
    assert arr[:20].mean() < 60 and arr[-20:].mean() > 200  # left half black -> top half after rotation


@pytest.mark.parametrize(
    "data, reason, detail",
    [
        (imagefiles.truncated_jpeg(), "decode_failed", ""),
        (b"", "decode_failed", "0-byte"),
        (imagefiles.html_page(), "decode_failed", "HTML"),
        (imagefiles.bomb_png(), "decompression_bomb", "1600000000 pixels"),
    ],
)
def test_bad_files_fail_with_a_reason(data, reason, detail):
    with pytest.raises(RowFailure) as e:
        dec(data)
    assert e.value.reason == reason and detail in e.value.detail


def test_bomb_is_refused_before_decoding(monkeypatch):
    loaded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: loaded.append(1))
    with pytest.raises(RowFailure):
        dec(imagefiles.bomb_png())
    assert loaded == []


def test_too_small_after_decoding():
    with pytest.raises(RowFailure) as e:
        dec(imagefiles.jpeg(200), min_side=500, longest=1024)
    assert e.value.reason == "image_too_small"


def test_decode_stage_keeps_good_rows_and_marks_bad_ones(smoke_cfg):
    stage = DecodeStage(smoke_cfg.decode)
    batch = {
        "key": ["a", "b", "c"],
        "image": [imagefiles.jpeg(), imagefiles.html_page(), b""],
        "status": ["ok", "ok", "download_failed"],
        "fail_stage": ["", "", "download"],
        "fail_detail": ["", "", "404"],
    }
    out = stage(batch)
    assert out["status"] == ["ok", "decode_failed", "download_failed"]
    assert out["fail_detail"][2] == "404"  # failures from earlier stages pass through untouched
    assert Image.open(io.BytesIO(out["jpeg"][0])).size == (out["width"][0], out["height"][0])
    assert "image" not in out and out["jpeg"][1] == b""
