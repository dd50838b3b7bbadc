"""The masks and labels stages with either engine: selection, equivalence, empty masks, GPU OOM,
freed memory kept on a CPU."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import imagefiles
import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image

from ssam.overlay import rle_ious
from ssam.pipeline.config import load_config
from ssam.stages.labels import LabelStage
from ssam.stages.masks import MaskStage


def smoke(*overrides):
    return load_config(REPO / "configs/pipeline/smoke.yaml", ["output.dir=/tmp/unused", *overrides])


def rows(jpegs, candidates=("cat", "dog", "rocket", "coffee cup")):
    n = len(jpegs)
    cands = json.dumps([{"label": c, "source": "caption"} for c in candidates])
    return {
        "key": [f"{i:04d}" for i in range(n)],
        "jpeg": list(jpegs),
        "status": ["ok"] * n,
        "fail_stage": [""] * n,
        "fail_detail": [""] * n,
        "candidates_json": [cands] * n,
    }


def photos():
    from skimage import data

    out = []
    for img in (data.astronaut(), data.coffee(), data.chelsea()):
        im = Image.fromarray(img)
        im.thumbnail((320, 320))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=92)
        out.append(buf.getvalue())
    return out


def masks_of(anns_json):
    return [a["segmentation"] for a in json.loads(anns_json)]


def matched(a, b, thresh=0.9):
    """Share of the RLEs in ``a`` that one in ``b`` matches at IoU >= thresh."""
    if not a:
        return 1.0
    if not b:
        return 0.0
    return float((rle_ious(a, b).max(1) >= thresh).mean())


def test_the_shipped_default_is_the_batched_engine_and_both_are_selectable():
    cfg = smoke()
    assert cfg.masks.engine == "batched" and cfg.labels.engine == "batched"
    ref = smoke("masks.engine=reference", "labels.engine=reference")
    assert MaskStage(ref.masks, ref.seed).engine is None
    assert MaskStage(cfg.masks, cfg.seed).engine is not None
    with pytest.raises(ValueError, match="engine"):
        smoke("masks.engine=fast")


@pytest.fixture(scope="module")
def both_outputs():
    """Masks then labels of three real photos through each engine, the smoke models' defaults."""
    out = {}
    for engine in ("reference", "batched"):
        cfg = smoke(f"masks.engine={engine}", f"labels.engine={engine}")
        masked = MaskStage(cfg.masks, cfg.seed)(rows(photos()))
        out[engine] = (masked, cfg)
    return out


def test_batched_masks_equal_the_reference_masks(both_outputs):
    ref, bat = both_outputs["reference"][0], both_outputs["batched"][0]
    assert ref["status"] == bat["status"] == ["ok"] * 3
    for a, b in zip(ref["annotations_json"], bat["annotations_json"], strict=True):
        ma, mb = masks_of(a), masks_of(b)
        assert abs(len(ma) - len(mb)) <= max(1, len(ma) // 20)
        assert matched(ma, mb) >= 0.95 and matched(mb, ma) >= 0.95


def test_batched_labels_equal_the_reference_labels_on_the_same_masks(both_outputs):
    masked, cfg = both_outputs["reference"]
    labelled = {}
    for engine in ("reference", "batched"):
        section = cfg.labels.model_copy(
            update={"engine": engine, "score_threshold": 0.0, "margin_threshold": 0.0}
        )
        labelled[engine] = LabelStage(section, cfg.seed)(dict(masked))
    ref_l = [a["label"] for j in labelled["reference"]["annotations_json"] for a in json.loads(j)]
    bat_l = [a["label"] for j in labelled["batched"]["annotations_json"] for a in json.loads(j)]
    assert ref_l and np.mean([x == y for x, y in zip(ref_l, bat_l, strict=True)]) >= 0.95
    for ea, eb in zip(labelled["reference"]["emb"], labelled["batched"]["emb"], strict=True):
        a, b = np.load(io.BytesIO(ea)).astype(np.float32), np.load(io.BytesIO(eb)).astype(np.float32)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert cos.min() >= 0.98


@pytest.mark.parametrize("engine", ["batched", "reference"])
def test_no_empty_or_degenerate_annotation_is_written(engine):
    """A flat gray image: either no masks at all, or none smaller than masks.min_mask_area."""
    cfg = smoke(f"masks.engine={engine}", "masks.pred_iou_thresh=0", "masks.stability_score_thresh=0")
    buf = io.BytesIO()
    Image.new("RGB", (200, 150), (128, 128, 128)).save(buf, "JPEG")
    out = MaskStage(cfg.masks, cfg.seed)(rows([buf.getvalue()]))
    anns = json.loads(out["annotations_json"][0])
    assert out["status"][0] in ("ok", "no_masks")
    assert all(a["area"] >= cfg.masks.min_mask_area and a["bbox"][2] > 0 and a["bbox"][3] > 0 for a in anns)
    assert cfg.masks.min_mask_area > 0  # the shipped default drops degenerate masks


def oom_when_more_than(limit, fn):
    """Wrap a batch function to raise CUDA's out-of-memory error above ``limit`` items (a simulated GPU)."""

    def wrapped(items, *args, **kwargs):
        if len(items) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return fn(items, *args, **kwargs)

    return wrapped


def test_masks_oom_splits_the_batch_and_a_row_that_never_fits_fails_as_gpu_oom(monkeypatch):
    cfg = smoke()
    stage = MaskStage(cfg.masks, cfg.seed)
    batch = rows([imagefiles.jpeg(s) for s in (200, 240, 260, 300)])
    whole = stage(dict(batch))
    monkeypatch.setattr(stage.engine, "_generate_group", oom_when_more_than(1, stage.engine._generate_group))
    split = stage(dict(batch))
    assert split["status"] == ["ok"] * 4
    for a, b in zip(whole["annotations_json"], split["annotations_json"], strict=True):
        # one image per encoder forward instead of four: float rounding may flip a marginal mask
        assert matched(masks_of(a), masks_of(b)) >= 0.95 and matched(masks_of(b), masks_of(a)) >= 0.95
    monkeypatch.setattr(stage.engine, "_generate_group", oom_when_more_than(0, stage.engine._generate_group))
    failed = stage(dict(batch))
    assert failed["status"] == ["gpu_oom"] * 4 and failed["fail_stage"] == ["masks"] * 4


def test_labels_oom_splits_the_batch_and_a_row_that_never_fits_fails_as_gpu_oom(monkeypatch):
    import ssam.model.label_engine as engine

    cfg = smoke()
    masked = MaskStage(cfg.masks, cfg.seed)(rows([imagefiles.jpeg(s) for s in (200, 260, 300)]))
    stage = LabelStage(cfg.labels, cfg.seed)
    whole = stage(dict(masked))
    real = engine.embed_mask_crops

    def limited(bundle, images, annotations, **kw):
        if len(images) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(bundle, images, annotations, **kw)

    monkeypatch.setattr(engine, "embed_mask_crops", limited)
    split = stage(dict(masked))
    assert split["status"] == ["ok"] * 3 and split["annotations_json"] == whole["annotations_json"]
    monkeypatch.setattr(engine, "embed_mask_crops", lambda *a, **kw: limited(None, [0, 0], []))
    failed = stage(dict(masked))
    assert failed["status"] == ["gpu_oom"] * 3 and failed["fail_stage"] == ["labels"] * 3


def test_a_clip_tower_that_fails_to_compile_runs_eagerly(caplog):
    """labels.compile_clip (CUDA only: off on this CPU) and its fallback: an image tower whose
    compiled form raises is dropped for the model's own, with a warning, and the rows are the same."""
    cfg = smoke("labels.compile_clip=true")
    masked = MaskStage(cfg.masks, cfg.seed)(rows([imagefiles.jpeg(s) for s in (200, 260)]))
    stage = LabelStage(cfg.labels, cfg.seed)
    assert not stage.encode.compiled  # a CPU model is never compiled
    whole = stage(dict(masked))
    calls = []

    def broken(pixels):
        calls.append(len(pixels))
        raise RuntimeError("simulated Inductor failure")

    stage.encode.fn = broken  # as if compiled
    with caplog.at_level("WARNING"):
        again = stage(dict(masked))
    assert len(calls) == 1  # tried once, then never again
    assert not stage.encode.compiled and "running it eagerly" in caplog.text  # eager from now on
    assert again["status"] == ["ok"] * 2 and again["annotations_json"] == whole["annotations_json"]


def test_fused_gpu_stages_give_the_same_rows_as_separate_stages():
    from ssam.pipeline.graph import _run_chain, stage_plan
    from ssam.stages.fused import MasksAndLabelsStage

    cfg = smoke("ray.fuse_gpu_stages=true")
    plan = stage_plan(cfg)
    assert [p[0] for p in plan] == ["decode", "candidates", "masks"] and plan[-1][1] is MasksAndLabelsStage
    assert [p[0] for p in stage_plan(smoke())] == ["decode", "candidates", "masks", "labels"]
    batch = rows([imagefiles.jpeg(s) for s in (200, 260)])
    fused = MasksAndLabelsStage(cfg.masks, cfg.labels, cfg.seed)
    separate = [(MaskStage(cfg.masks, cfg.seed), 2), (LabelStage(cfg.labels, cfg.seed), 2)]
    a, b = fused(dict(batch)), _run_chain(separate, dict(batch))
    assert a["status"] == b["status"] == ["ok", "ok"]
    assert a["annotations_json"] == b["annotations_json"] and a["emb"] == b["emb"]
    assert "t_masks" in a and "t_labels" in a  # the run summary still sees both stages


def test_the_cpu_labels_stage_reuses_freed_memory_instead_of_faulting_in_fresh_pages():
    """On a CPU the stages keep freed buffers (``ssam.device.keep_freed_memory``): a freed 48 MiB
    buffer's pages are reused, where glibc's default maps fresh ones (12,289 faults here); after the
    first batches, a batch of the shipped labels stage touches almost no fresh page (glibc's default
    faulted thousands here in some runs and none in others: it depends on the heap's history); the
    rows are the same either way."""
    script = Path(__file__).with_name("labels_page_faults.py")
    runs = {}
    for keep in ("1", "0"):
        env = {**os.environ, "SSAM_KEEP_FREED_MEMORY": keep}
        proc = subprocess.run(
            [sys.executable, str(script), str(REPO / "configs/pipeline/smoke.yaml")],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[keep] = json.loads(proc.stdout.strip().splitlines()[-1])
    kept, fresh = runs["1"], runs["0"]
    assert kept["kept"] and not fresh["kept"]
    assert kept["status"] == fresh["status"] == ["ok"] * 3 and kept["rows"] == fresh["rows"]
    assert kept["buffer_faults"] < 100 and fresh["buffer_faults"] > 10_000, (kept, fresh)
    assert kept["faults"] < 1500, (kept, fresh)  # measured 0-221


def test_bf16_runs_on_cuda_by_default_and_on_a_cpu_only_when_asked_and_native(monkeypatch, caplog):
    import ssam.device as devices

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert devices.use_bf16(cuda, True, False) and not devices.use_bf16(cuda, False, True)
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: True)
    assert devices.use_bf16(cpu, True, True) and devices.use_bf16(cpu, False, True)
    assert not devices.use_bf16(cpu, True, False)  # the shipped default on a CPU: float32
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(devices, "_warned_no_cpu_bf16", [])
    assert not devices.use_bf16(cpu, True, True) and not devices.use_bf16(cpu, True, True)
    assert caplog.text.count("neither AVX512-BF16 nor AMX: running in float32") == 1  # warned once
    cfg = smoke()
    assert cfg.masks.bf16 and cfg.labels.bf16 and not cfg.masks.cpu_bf16 and not cfg.labels.cpu_bf16


def test_cpu_bf16_from_the_config_runs_both_batched_stages_in_bf16(monkeypatch):
    """``masks.cpu_bf16`` / ``labels.cpu_bf16`` on a CPU with bf16 in hardware (forced here, so
    the path runs on any CPU): the mask decoder is a bf16 copy, the encoders run under bf16
    autocast, and the rows are whole. The smoke CLIP's crop embeddings stay within bf16's rounding
    of float32's (the smoke SAM's random masks do not: its logits sit near 0, where bf16 moves
    them across the threshold, so only the features are compared for SAM)."""
    import ssam.device as devices
    from ssam.model.amg import sam_image_features

    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: True)
    fp32, bf16 = smoke(), smoke("masks.cpu_bf16=true", "labels.cpu_bf16=true")
    stage = MaskStage(bf16.masks, bf16.seed)
    assert stage.bf16 and stage.engine.bf16  # the encoder's (both engines) and the batched engine's
    assert stage.engine.decoder.iou_token.weight.dtype == torch.bfloat16
    assert stage.sam.mask_decoder.iou_token.weight.dtype == torch.float32  # the model itself unchanged
    assert not MaskStage(fp32.masks, fp32.seed).engine.bf16
    ims = [np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) for j in photos()]
    [(f32, _)] = sam_image_features(stage.sam, ims[:1], 1, False)
    [(f16, _)] = sam_image_features(stage.sam, ims[:1], 1, True)
    cos = torch.nn.functional.cosine_similarity(f32.flatten(1), f16.flatten(1)).item()
    assert not torch.equal(f32, f16) and cos > 0.99
    masked = stage(rows(photos()))
    assert masked["status"] == ["ok"] * 3
    emb = {}
    for name, cfg in (("fp32", fp32), ("bf16", bf16)):
        section = cfg.labels.model_copy(update={"score_threshold": 0.0, "margin_threshold": 0.0})
        labels = LabelStage(section, cfg.seed)
        assert labels.bf16 == (name == "bf16")
        out = labels(dict(masked))
        assert out["status"] == ["ok"] * 3
        emb[name] = np.concatenate([np.load(io.BytesIO(e)).astype(np.float32) for e in out["emb"]])
    a, b = emb["fp32"], emb["bf16"]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert not np.array_equal(a, b) and cos.min() > 0.99


def test_each_stage_runs_at_its_own_torch_threads_and_leaves_the_process_setting_alone(monkeypatch, request):
    """The shipped smoke config gives the masks stage one CPU thread. torch's setting is
    process-wide: set once by the masks stage (as it was, in its constructor), the labels stage
    sharing its process (the local executor, fused stages) ran at one thread too."""
    from ssam.pipeline.graph import _run_chain

    cfg = smoke("labels.torch_threads=2")
    assert cfg.masks.torch_threads == 1 and smoke().labels.torch_threads == 0
    before = torch.get_num_threads()
    request.addfinalizer(lambda: torch.set_num_threads(before))
    torch.set_num_threads(3)
    masks, labels = MaskStage(cfg.masks, cfg.seed), LabelStage(cfg.labels, cfg.seed)
    assert torch.get_num_threads() == 3  # building a stage changes nothing
    seen = {}
    for stage in (masks, labels):
        process = stage.process
        monkeypatch.setattr(
            stage,
            "process",
            lambda b, s=stage, p=process: (seen.setdefault(s.name, torch.get_num_threads()), p(b)),
        )
    out = _run_chain([(masks, 2), (labels, 2)], rows([imagefiles.jpeg(s) for s in (200, 260)]))
    assert out["status"] == ["ok", "ok"]
    assert seen == {"masks": 1, "labels": 2}
    assert torch.get_num_threads() == 3  # and put back after each batch
    plain = LabelStage(smoke().labels, cfg.seed)
    plain(rows([imagefiles.jpeg(200)]) | {"annotations_json": [out["annotations_json"][0]]})
    assert torch.get_num_threads() == 3  # 0: the process's setting, untouched
