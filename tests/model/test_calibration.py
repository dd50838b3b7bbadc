import io
import tarfile

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image
from segment_anything.utils.amg import calculate_stability_score

from ssam.model.amg import AmgSettings, MaskEngine
from ssam.model.calibration import IouCalibration, best_match_ious, fit_isotonic_median
from ssam.model.predictor import SemanticPredictor
from ssam.model.semantic_sam import (
    CheckpointError,
    build_semantic_sam,
    load_model,
    read_checkpoint,
    save_model,
)

PHOTO = REPO / "sample/images/chelsea.jpg"
SMOKE_CLIP = {"name": "ssam-smoke-clip", "pretrained": None, "seed": 0, "embed_dim": 32, "smoke": True}


def test_isotonic_median_pools_violators_into_their_median():
    xs, ys = fit_isotonic_median(np.array([4.0, 1, 3, 2]), np.array([4.0, 1, 2, 3]))
    # sorted by x: y = 1, 3, 2, 4 -> (3, 2) violate and pool at x 2.5 to their median 2.5
    assert xs.tolist() == [1.0, 2.5, 4.0] and ys.tolist() == [1.0, 2.5, 4.0]
    # a block of mostly good masks with one junk one: the median follows the majority, not the mean
    xs, ys = fit_isotonic_median(np.array([0.1, 0.2, 0.3]), np.array([0.9, 0.9, 0.1]))
    assert ys.tolist() == [0.9] and xs[0] == pytest.approx(0.2)  # the mean would say 0.63


def test_a_head_that_underrates_good_masks_is_mapped_to_what_they_are():
    """Seed 3's failure in miniature: good masks (true IoU ~0.9) predicted at 0.2-0.35, junk at
    0-0.15; the fitted map sends each to its true level, keeps the order strictly, and round-trips."""
    g = np.random.default_rng(0)
    junk_p, junk_t = g.uniform(0.0, 0.15, 200), g.uniform(0.0, 0.2, 200)
    good_p, good_t = g.uniform(0.2, 0.35, 300), g.uniform(0.85, 0.97, 300)
    pred, true = np.r_[junk_p, good_p], np.r_[junk_t, good_t]
    cal = IouCalibration.fit(pred, true, images=50)
    assert cal.masks == 500 and cal.images == 50
    assert cal.error_before > 0.4 and cal.error_after < 0.06
    assert np.all(np.diff(cal.raw) > 0) and np.all(np.diff(cal.calibrated) > 0)  # strictly increasing
    assert 0 <= min(cal.calibrated) and max(cal.calibrated) <= 1
    probe = torch.tensor([[-1.0, 0.05, 0.1], [0.25, 0.3, 2.0]])
    out = cal.apply(probe)
    assert out.shape == probe.shape
    assert np.allclose(out.numpy(), cal.apply_np(probe.numpy()), atol=1e-6)  # torch == numpy
    assert out[0, 0] == pytest.approx(cal.calibrated[0]) and out[1, 2] == pytest.approx(cal.calibrated[-1])
    assert out[0, 1] < 0.25 and out[1, 0] > 0.8  # junk stays low, good masks are lifted
    assert IouCalibration.from_dict(cal.to_dict()) == cal
    assert IouCalibration.from_dict(None) is None and IouCalibration.fit(np.zeros(0), np.zeros(0)) is None


def test_stability_is_weighed_in_when_it_ranks_masks_better_than_the_head():
    """The head says nothing (the same spread for good and junk masks), stability separates them:
    the fit chooses stability's weight and needs it to apply; without stability, the head alone."""
    g = np.random.default_rng(1)
    pred = g.uniform(0.2, 0.3, 400)
    good = np.arange(400) % 2 == 0
    true = np.where(good, g.uniform(0.85, 0.95, 400), g.uniform(0.0, 0.1, 400))
    stab = np.where(good, g.uniform(0.8, 1.0, 400), g.uniform(0.0, 0.5, 400))
    stab[1] = np.nan  # an empty mask's stability (0 / 0): taken as 0
    head_only = IouCalibration.fit(pred, true, images=10)
    both = IouCalibration.fit(pred, true, stab, images=10)
    assert head_only.stability_weight == 0 and head_only.error_after > 0.3
    assert both.stability_weight >= 0.5 and both.error_after < 0.06 and both.uses_stability
    t = both.apply(torch.tensor(pred[:6]), torch.tensor(stab[:6]))
    assert torch.isfinite(t).all() and np.allclose(t.numpy(), both.apply_np(pred[:6], stab[:6]), atol=1e-6)
    with pytest.raises(ValueError, match="stability"):
        both.apply(torch.tensor(pred))
    # a head as good as stability: the head alone is kept (no weight without a strict gain)
    assert IouCalibration.fit(true, true, stab).stability_weight == 0


def test_a_bad_recorded_calibration_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="increasing 'raw' knots"):
        IouCalibration.from_dict({"raw": [0.5, 0.2], "calibrated": [0.1, 0.9]})
    path = tmp_path / "model.pt"
    save_model(
        path,
        build_semantic_sam("smoke", 32),
        SMOKE_CLIP,
        {"iou_calibration": {"raw": [0.1], "calibrated": []}},
    )
    with pytest.raises(CheckpointError, match=r"model\.pt: iou_calibration"):
        load_model(path)


def test_best_match_iou_is_against_the_best_annotation():
    from pycocotools import mask as mask_utils

    def rle(y0, y1):
        m = np.zeros((8, 8), np.uint8, order="F")
        m[y0:y1] = 1
        r = mask_utils.encode(m)
        return {"segmentation": {"size": r["size"], "counts": r["counts"].decode()}}

    preds, gts = [rle(0, 4), rle(4, 6)], [rle(0, 2), rle(0, 4), rle(4, 8)]
    assert best_match_ious(preds, gts).tolist() == [1.0, 0.5]
    assert best_match_ious(preds, []).tolist() == [0.0, 0.0] and len(best_match_ious([], gts)) == 0


def test_the_engine_and_the_predictor_report_the_calibrated_iou_and_keep_the_same_masks(tmp_path):
    """A checkpoint's map goes through load_model into automatic mode (thresholds and records) and
    box prompts; monotone, it leaves the masks and their order as the raw head had them."""
    image = np.asarray(Image.open(PHOTO).convert("RGB"))
    model = build_semantic_sam("smoke", 32, seed=1)
    with torch.no_grad():  # random logits stay within +-1, where every stability is 0: sharpen them
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(300)
    cal = IouCalibration([-20.0, 0.0, 20.0], [0.05, 0.5, 0.95])  # a smooth squash of any raw value
    path = tmp_path / "model.pt"
    save_model(path, model, SMOKE_CLIP, {"iou_calibration": cal.to_dict()})
    loaded, _ = load_model(path)
    assert loaded.iou_calibration == cal
    loose = {"points_per_side": 6, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0}  # random weights
    settings = AmgSettings(pred_iou_thresh=0.0, **loose)
    [calibrated] = MaskEngine(loaded, settings).generate([image])
    loaded.iou_calibration = None
    [raw] = MaskEngine(loaded, settings).generate([image])
    assert len(raw.records) > 3 and [r["segmentation"] for r in raw.records] == [
        r["segmentation"] for r in calibrated.records
    ]
    raw_iou = np.array([r["predicted_iou"] for r in raw.records])
    assert np.allclose([r["predicted_iou"] for r in calibrated.records], cal.apply_np(raw_iou), atol=1e-5)
    # the threshold applies to the calibrated value: 0.5 here is a raw 0, which keeps fewer masks
    loaded.iou_calibration = cal
    [cut] = MaskEngine(
        loaded, AmgSettings(points_per_side=6, pred_iou_thresh=0.5, stability_score_thresh=0.0)
    ).generate([image])
    kept = [r["segmentation"] for r, p in zip(raw.records, raw_iou, strict=True) if p > 1e-4]
    assert 0 < len(cut.records) < len(raw.records)
    assert [r["segmentation"] for r in cut.records if r["predicted_iou"] > 0.5 + 1e-5] == kept
    # box prompts: the same mask, its IoU through the map
    pred = SemanticPredictor(loaded)
    pred.set_image(image)
    boxes = np.array([[100, 50, 300, 250], [10, 10, 60, 60]], np.float32)
    m_cal, iou_cal, _, _ = pred.predict(boxes=boxes)
    loaded.iou_calibration = None
    m_raw, iou_raw, _, _ = pred.predict(boxes=boxes)
    assert np.array_equal(m_cal, m_raw) and np.allclose(iou_cal, cal.apply_np(iou_raw), atol=1e-5)

    # a map of the stability score alone (weight 1, identity): automatic mode reports each mask's
    # stability and thresholds it after upscaling; box prompts the stability of the chosen mask
    loaded.iou_calibration = IouCalibration([0.0, 1.0], [0.0, 1.0], stability_weight=1.0)
    [stab] = MaskEngine(loaded, settings).generate([image])
    by_mask = {r["segmentation"]["counts"]: r for r in raw.records}
    assert {r["segmentation"]["counts"] for r in stab.records} == set(by_mask)  # no NMS: the same masks
    assert all(r["predicted_iou"] == pytest.approx(r["stability_score"], abs=1e-5) for r in stab.records)
    assert len({round(r["stability_score"], 3) for r in stab.records}) > 10
    assert all(
        r["stability_score"] == pytest.approx(by_mask[r["segmentation"]["counts"]]["stability_score"])
        for r in stab.records
    )
    cut = 0.5 * (
        min(r["stability_score"] for r in stab.records) + max(r["stability_score"] for r in stab.records)
    )
    [high] = MaskEngine(loaded, AmgSettings(pred_iou_thresh=cut, **loose)).generate([image])
    assert 0 < len(high.records) < len(stab.records) and all(r["predicted_iou"] > cut for r in high.records)
    m_stab, iou_stab, _, _ = pred.predict(boxes=boxes)
    with torch.inference_mode():
        low, raw_iou = pred._decode(boxes=boxes)[:2]
        best = raw_iou[:, 1:].argmax(1) + 1
        logits = pred._upscale(low[torch.arange(2), best][:, None])[:, 0]
    expected = calculate_stability_score(logits, loaded.mask_threshold, 1.0).numpy()
    assert np.array_equal(m_stab, m_raw) and np.allclose(iou_stab, expected, atol=1e-5) and expected.max() > 0


def test_training_fits_the_calibration_on_samples_it_never_trained_on_and_writes_it(tmp_path):
    from ssam.model.synthetic import write_shapes
    from ssam.model.train import Trainer, fit
    from ssam.model.train_config import load_train_config

    write_shapes(tmp_path / "shards", images=32, per_shard=8, seed=0, emb_dim=32)
    shards = f'data.shards=["{tmp_path / "shards"}"]'
    cfg = load_train_config(
        REPO / "configs/train/smoke.yaml", [shards, "train.max_steps=4", "train.calibration_images=4"]
    )
    trainer = Trainer(cfg, tmp_path / "run")
    # held out: the first 4 samples in shard order (there are at least 8 x 4)
    held = trainer.held_out
    assert held.source == "ours" and [k for _, k in held.keys] == [f"000{i:06d}" for i in range(4)]
    seen, draw = [], trainer.data.next
    trainer.data.next = lambda: seen.append(draw()) or seen[-1]
    fit(trainer, resume=False, progress=False)
    # 4 steps x 8 images: every one of the 28 other samples, never a held-out one
    assert len(seen) == 32 and {s.key for s in seen} == {f"000{i:06d}" for i in range(4, 32)}
    rec = read_checkpoint(tmp_path / "run/model.pt")["iou_calibration"]
    assert (rec["source"], rec["images"]) == ("held-out", 4) and rec["masks"] > 0
    assert rec["error_after"] <= rec["error_before"]
    model, _ = load_model(tmp_path / "run/model.pt")
    assert model.iou_calibration == IouCalibration.from_dict(rec)
    # off: nothing recorded, the raw head, nothing held out
    cfg = load_train_config(
        REPO / "configs/train/smoke.yaml", [shards, "train.max_steps=1", "train.calibration_images=0"]
    )
    trainer = Trainer(cfg, tmp_path / "off")
    assert trainer.held_out is None
    fit(trainer, resume=False, progress=False)
    assert read_checkpoint(tmp_path / "off/model.pt")["iou_calibration"] is None
    assert load_model(tmp_path / "off/model.pt")[0].iou_calibration is None


def test_the_calibration_images_come_from_calibration_shards_or_training_when_asked(tmp_path):
    from ssam.model.data import first_good_keys, holdout_keys, resolve_tars
    from ssam.model.synthetic import write_shapes
    from ssam.model.train import Trainer, fit_iou_calibration
    from ssam.model.train_config import load_train_config

    write_shapes(tmp_path / "shards", images=32, per_shard=8, seed=0, emb_dim=32)
    write_shapes(tmp_path / "val", images=16, per_shard=8, seed=5, emb_dim=32)

    def trainer(*sets):
        sets = [f'data.shards=["{tmp_path / "shards"}"]', "train.calibration_images=4", *sets]
        return Trainer(load_train_config(REPO / "configs/train/smoke.yaml", sets), tmp_path / "t")

    t = trainer(f'data.calibration_shards=["{tmp_path / "val"}"]')  # a separate set: nothing held out
    assert t.held_out is None
    cal = fit_iou_calibration(t, 4)
    assert (cal.source, cal.images) == ("calibration_shards", 4)
    t = trainer("train.calibration_holdout=false")
    assert t.held_out is None and fit_iou_calibration(t, 4).source == "training"
    # small data: nothing is held out unless there are 8 times as many samples
    tars = resolve_tars([str(tmp_path / "val")])
    assert holdout_keys(tars, 4) == [] and len(holdout_keys(tars, 2)) == 2 and holdout_keys(tars[:1], 2) == []
    t = trainer("train.calibration_images=5")  # 32 samples: 4 could be held out, 5 cannot
    assert t.held_out.keys == () and fit_iou_calibration(t, 5).source == "training"
    assert [k for _, k in first_good_keys(tars, 4)] == [f"005{i:06d}" for i in range(4)]
    # a sample that breaks the format is never picked (training counts it as bad data)
    with tarfile.open(tmp_path / "a_broken.tar", "w") as tar:
        for name, payload in (("k1.jpg", b"\xff\xd8"), ("k1.json", b"{not json")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    assert first_good_keys([tmp_path / "a_broken.tar", *tars], 1) == [(str(tars[0]), "005000000")]
