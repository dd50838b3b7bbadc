import io
import json

import imagefiles
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from ssam.format import validate_sample
from ssam.stages.labels import LabelStage, choose_labels, crop_with_background
from ssam.stages.masks import MaskStage, image_from_jpeg


def _rows(jpegs, candidates=None):
    n = len(jpegs)
    return {
        "key": [f"{i:04d}" for i in range(n)],
        "jpeg": jpegs,
        "status": ["ok"] * n,
        "fail_stage": [""] * n,
        "fail_detail": [""] * n,
        "candidates_json": [json.dumps(c) for c in (candidates or [[]] * n)],
    }


def _smoke_masks_cfg(**update):
    from conftest import REPO

    from ssam.pipeline.config import load_config

    cfg = load_config(REPO / "configs/pipeline/smoke.yaml", ["output.dir=/tmp/unused"])
    return cfg.masks.model_copy(update=update), cfg.seed


@pytest.fixture(scope="module", params=["batched", "reference"])
def mask_stage(request):
    return MaskStage(*_smoke_masks_cfg(engine=request.param))


def test_masks_on_a_real_photo_are_valid_sa1b_annotations(mask_stage):
    jpeg = imagefiles.jpeg(300)
    out = mask_stage(_rows([jpeg, jpeg]))
    assert out["status"] == ["ok", "ok"]
    anns = json.loads(out["annotations_json"][0])
    h, w = image_from_jpeg(jpeg).shape[:2]
    assert 0 < len(anns) <= mask_stage.cfg.max_masks_per_image
    assert [a["id"] for a in anns] == list(range(len(anns)))
    ious = [a["predicted_iou"] for a in anns]
    assert ious == sorted(ious, reverse=True)
    for a in anns:
        m = mask_utils.decode(
            {"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()}
        )
        assert m.shape == (h, w) and int(m.sum()) == a["area"] > 0
        ys, xs = np.nonzero(m)
        assert a["bbox"][0] == pytest.approx(xs.min(), abs=1) and a["bbox"][1] == pytest.approx(
            ys.min(), abs=1
        )
    assert out["annotations_json"][0] == out["annotations_json"][1]  # batched = deterministic per image


def test_batched_encoder_features_equal_segment_anythings_own():
    """Batched encoding (padding, normalising, several images a forward) gives each image the
    features segment-anything's predictor gives it alone, from the same resized image (the resize
    itself is checked against segment-anything's PIL one in tests/model/test_amg.py)."""
    from segment_anything import SamPredictor

    from ssam.model.amg import resize_longest_side

    mask_stage = MaskStage(*_smoke_masks_cfg(engine="reference"))
    images = [image_from_jpeg(imagefiles.jpeg(s)) for s in (300, 200, 260)]
    batched = mask_stage.embed(images)
    ref = SamPredictor(mask_stage.sam)
    for im, (feats, size) in zip(images, batched, strict=True):
        ref.set_torch_image(
            resize_longest_side(im, ref.model.image_encoder.img_size, ref.device), im.shape[:2]
        )
        assert tuple(ref.input_size) == size
        torch.testing.assert_close(feats, ref.features, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("engine", ["batched", "reference"])
def test_no_masks_is_a_failure_record_not_a_crash(engine):
    stage = MaskStage(*_smoke_masks_cfg(engine=engine, pred_iou_thresh=1.0))  # IoU > 1: nothing passes
    out = stage(_rows([imagefiles.jpeg(200)]))
    assert out["status"] == ["no_masks"] and out["fail_stage"] == ["masks"]


def test_choose_labels_thresholds_margin_and_background():
    names = ["car", "wheel", "background"]
    scores = np.array([[0.7, 0.2, 0.1], [0.35, 0.33, 0.32], [0.1, 0.2, 0.7], [0.25, 0.1, 0.05]])
    picks = choose_labels(scores, names, n_candidates=2, top_k=2, score_threshold=0.3, margin_threshold=0.05)
    assert picks[0][0] == "car" and picks[0][1] == pytest.approx(0.7)
    assert picks[0][2] == [{"label": "car", "score": 0.7}, {"label": "wheel", "score": 0.2}]
    assert picks[1][0] is None  # runner-up too close
    assert (
        picks[2][0] is None and picks[2][2][0]["label"] == "wheel"
    )  # background won; topk has candidates only
    assert picks[3][0] is None  # below the score threshold


def test_choose_labels_for_all_masks_at_once_is_the_row_by_row_rule():
    """The vectorised choice against the rule written out row by row, on random scores with exact
    ties (the lower column wins), one candidate or many, with and without background labels."""

    def by_row(scores, names, n_cand, top_k, score_thr, margin_thr):
        out = []
        for row in scores:
            order = sorted(range(len(row)), key=lambda j: (-row[j], j))
            best = order[0]
            cands = [j for j in order if j < n_cand][:top_k]
            margin = float(row[best] - row[order[1]]) if len(order) > 1 else float(row[best])
            ok = best < n_cand and row[best] >= score_thr and margin >= margin_thr
            score = float(row[best]) if ok else float(row[cands[0]])
            topk = [{"label": names[j], "score": round(float(row[j]), 4)} for j in cands]
            out.append((names[best] if ok else None, round(score, 4), topk))
        return out

    rng = np.random.default_rng(0)
    for n_cand, n_bg in [(1, 3), (5, 3), (30, 3), (2, 0)]:
        names = [f"label{j}" for j in range(n_cand + n_bg)]
        logits = rng.normal(size=(40, n_cand + n_bg)) * rng.choice([0.1, 3.0], size=(40, 1))
        logits[:10, -1] = logits[:10, 0]  # ties between the first and the last column
        probs = np.exp(logits)
        probs = (probs / probs.sum(1, keepdims=True)).astype(np.float32)
        for thresholds in [(0.3, 0.05), (0.0, 0.0), (0.9, 0.5)]:
            assert choose_labels(probs, names, n_cand, 3, *thresholds) == by_row(
                probs, names, n_cand, 3, *thresholds
            )
    assert choose_labels(np.zeros((0, 4), np.float32), names[:4], 2, 3, 0.3, 0.05) == []


def test_crop_dims_outside_the_mask_only():
    img = np.full((20, 20, 3), 200, np.uint8)
    mask = np.zeros((20, 20), bool)
    mask[5:10, 5:10] = True
    crop = np.asarray(crop_with_background(img, mask, [5, 5, 5, 5], 0.4, "dim", 0.25, 0))
    assert crop.shape == (9, 9, 3)
    assert crop[4, 4, 0] == 200 and crop[0, 0, 0] == 50


def test_label_stage_names_masks_from_candidates_with_embeddings(smoke_cfg, mask_stage):
    stage = LabelStage(smoke_cfg.labels, smoke_cfg.seed)
    jpeg = imagefiles.jpeg(240)
    batch = mask_stage(
        _rows(
            [jpeg, jpeg],
            [[{"label": "astronaut", "source": "caption"}, {"label": "flag", "source": "llm"}], []],
        )
    )
    out = stage(batch)
    assert out["status"] == ["ok", "ok"]
    anns, anns_none = json.loads(out["annotations_json"][0]), json.loads(out["annotations_json"][1])
    assert all(a["label"] in ("astronaut", "flag") for a in anns)  # smoke config: no background labels
    assert all(a["label"] is None and a["topk"] == [] for a in anns_none)
    emb = np.load(io.BytesIO(out["emb"][0]))
    assert emb.dtype == np.float16 and emb.shape == (len(anns), stage.clip.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=1e-2)
    meta = {
        "image": {
            "image_id": 0,
            "key": "0000",
            "file_name": "0000.jpg",
            "width": Image.open(io.BytesIO(jpeg)).size[0],
            "height": Image.open(io.BytesIO(jpeg)).size[1],
        },
        "candidates": [],
        "annotations": anns,
        "provenance": {"smoke": True},
    }
    assert validate_sample(meta, emb) == []


def test_text_embeddings_are_cached(smoke_cfg):
    stage = LabelStage(smoke_cfg.labels, smoke_cfg.seed)
    a = stage.text.get(["dog", "cat"])
    stage.clip.model.encode_text = None  # any second computation would now fail
    np.testing.assert_array_equal(stage.text.get(["cat", "dog"]), a[::-1])
