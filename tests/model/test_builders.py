import hashlib

import httpserver
import numpy as np
import pytest
import torch

from ssam.model import sam as sam_mod
from ssam.model.clip import SMOKE_CLIP, encode_texts, load_clip
from ssam.model.llm import build_generator, register_backend
from ssam.weights import WeightsUnavailable, fetch


def test_every_registered_sam_size_builds_with_the_right_shapes():
    # vit_b/l/h are built for shape only at their real width; smoke runs forward.
    for name in sam_mod.list_sam_sizes():
        size = sam_mod.get_sam_size(name)
        if name == "smoke":
            sam = sam_mod.build_sam(name)
            x = torch.zeros(1, 3, size.img_size, size.img_size)
            grid = size.img_size // size.patch_size
            assert sam.image_encoder(x).shape == (1, size.prompt_dim, grid, grid)
        else:
            assert size.checkpoint_url.endswith(".pth") and len(size.checkpoint_sha256) == 64


def test_registries_refuse_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        sam_mod.register_sam_size("vit_b", sam_mod.get_sam_size("smoke"))
    with pytest.raises(ValueError, match="already registered"):
        register_backend("none")(lambda m, **k: None)
    with pytest.raises(KeyError, match="unknown SAM size"):
        sam_mod.get_sam_size("vit_z")


def test_sam_checkpoint_round_trip_with_weights_only(tmp_path):
    sam = sam_mod.build_sam("smoke", seed=3)
    path = tmp_path / "smoke_sam.pth"
    torch.save(sam.state_dict(), path)
    loaded, prov = sam_mod.load_sam("smoke", str(path), seed=0)  # seed 0 init, then overwritten by the file
    for (k, a), (_, b) in zip(sam.state_dict().items(), loaded.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=k)
    assert prov["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_missing_checkpoint_is_a_clear_error_never_random_weights(tmp_path):
    with pytest.raises(WeightsUnavailable, match="does not exist"):
        sam_mod.load_sam("vit_b", str(tmp_path / "nope.pth"))
    with pytest.raises(WeightsUnavailable, match="fetching is off"):
        sam_mod.load_sam("vit_b", None)  # the tests run with SSAM_OFFLINE=1


def test_a_corrupt_or_foreign_checkpoint_is_refused_naming_the_file(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailable, match=f"SAM smoke checkpoint {junk}: not a loadable weights file"):
        sam_mod.load_sam("smoke", str(junk))
    with pytest.raises(WeightsUnavailable, match=f"CLIP {SMOKE_CLIP}/{junk}"):
        load_clip(SMOKE_CLIP, str(junk))
    foreign = tmp_path / "clip_as_sam.pth"  # a real weights file of another model
    torch.save(load_clip(SMOKE_CLIP, None).model.state_dict(), foreign)
    with pytest.raises(WeightsUnavailable, match=f"SAM smoke checkpoint {foreign} does not fit smoke"):
        sam_mod.load_sam("smoke", str(foreign))


def test_fetch_downloads_once_and_checks_sha256(tmp_path, monkeypatch):
    body = b"weights" * 1000
    monkeypatch.setenv("SSAM_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("SSAM_CACHE", str(tmp_path))
    routes = {
        "/w.pth": (200, "application/octet-stream", body),
        "/v.pth": (200, "application/octet-stream", body),
    }
    with httpserver.ImageServer(routes) as srv:
        good = hashlib.sha256(body).hexdigest()
        path = fetch(srv.url("/w.pth"), good)
        assert path.read_bytes() == body and fetch(srv.url("/w.pth"), good) == path
        assert srv.hits["/w.pth"] == 1  # the second call used the cache
        with pytest.raises(WeightsUnavailable, match="sha256"):
            fetch(srv.url("/v.pth"), "0" * 64)
        with pytest.raises(WeightsUnavailable, match="404"):
            fetch(srv.url("/missing.pth"))
    assert not list((tmp_path / "weights").glob("*.part"))  # no half-written file left behind


@pytest.mark.slow
def test_smoke_clip_checkpoint_round_trip(tmp_path):
    a = load_clip(SMOKE_CLIP, None, seed=1)
    path = tmp_path / "clip.pt"
    torch.save(a.model.state_dict(), path)
    b = load_clip(SMOKE_CLIP, str(path), seed=2)
    np.testing.assert_allclose(encode_texts(a, ["dog"]), encode_texts(b, ["dog"]), atol=1e-6)
    assert not np.allclose(
        encode_texts(load_clip(SMOKE_CLIP, None, seed=2), ["dog"]), encode_texts(a, ["dog"])
    )
    with pytest.raises(WeightsUnavailable):
        load_clip("ViT-B-32", "laion2b_s34b_b79k")  # offline: a clear error, not random weights


def test_the_seeded_smoke_clip_loads_without_open_clips_no_weights_warning(caplog):
    """open_clip warns (root logger) that it loaded no weights; the smoke CLIP's are seeded on
    purpose, so its load is quiet, and the filter does not outlive it."""
    import logging

    caplog.set_level(logging.WARNING)
    load_clip(SMOKE_CLIP, None, seed=0)
    assert "No pretrained weights loaded" not in caplog.text
    logging.getLogger().warning("No pretrained weights loaded for model 'x'")
    assert "No pretrained weights loaded" in caplog.text


def test_llm_backends():
    assert build_generator("none", "anything") is None
    with pytest.raises(KeyError, match="unknown LLM backend"):
        build_generator("gpt5", "x")
    with pytest.raises(WeightsUnavailable):
        build_generator("transformers", "Qwen/Qwen2.5-0.5B-Instruct")  # not cached, offline
