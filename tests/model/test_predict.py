import copy
import json

import numpy as np
import pytest
from conftest import REPO
from PIL import Image
from pycocotools.coco import COCO

from ssam.model.cli import eval_main, predict_main
from ssam.model.semantic_sam import build_semantic_sam, save_model
from ssam.model.synthetic import write_coco
from ssam.vocab import load_vocabulary

PHOTO = REPO / "sample/images/chelsea.jpg"
LOOSE = [
    "--points-per-side",
    "4",
    "--pred-iou-thresh=-100",
    "--stability-thresh=-1",
]  # random weights: keep all


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_model(
        path,
        build_semantic_sam("smoke", 32, seed=1),
        {"name": "ssam-smoke-clip", "pretrained": None, "seed": 0, "embed_dim": 32, "smoke": True},
    )
    return path


@pytest.mark.slow
def test_predict_on_a_real_photo_writes_coco_json_and_an_overlay(checkpoint, tmp_path, capsys):
    code = predict_main(
        [
            "--checkpoint",
            str(checkpoint),
            "--images",
            str(PHOTO),
            "--vocab",
            "coco",
            "--output",
            str(tmp_path),
            "--min-label-score",
            "0",
            *LOOSE,
        ]
    )
    assert code == 0 and "SMOKE MODEL" in capsys.readouterr().out
    preds = json.loads((tmp_path / "predictions.json").read_text())
    assert [c["name"] for c in preds["categories"]][:3] == ["person", "bicycle", "car"]
    assert preds["images"][0]["width"] == 451 and preds["info"]["smoke"] is True
    anns = preds["annotations"]
    assert anns and all(a["category_id"] is not None and a["label"] in load_vocabulary("coco") for a in anns)
    gt_like = {"images": preds["images"], "categories": preds["categories"], "annotations": []}
    (tmp_path / "gt.json").write_text(json.dumps(gt_like))
    res = COCO(str(tmp_path / "gt.json")).loadRes(
        copy.deepcopy(anns)
    )  # accepted as results (it edits its input)
    assert len(res.getAnnIds()) == len(anns)
    for a in anns:
        m = res.annToMask(res.anns[a["id"]])
        assert m.shape == (300, 451) and int(m.sum()) == a["area"]
    overlay = Image.open(tmp_path / "overlays" / "chelsea.png")
    assert overlay.size == (451, 300 + 28)  # image + smoke banner


def test_box_mode_gives_one_named_mask_per_box(checkpoint, tmp_path):
    code = predict_main(
        [
            "--checkpoint",
            str(checkpoint),
            "--images",
            str(PHOTO),
            "--vocab",
            "cat, dog,tiger",
            "--boxes",
            "100,50,300,250;10,10,60,60",
            "--output",
            str(tmp_path),
            "--min-label-score",
            "0",
        ]
    )
    assert code == 0
    anns = json.loads((tmp_path / "predictions.json").read_text())["annotations"]
    assert len(anns) == 2 and {a["label"] for a in anns} <= {"cat", "dog", "tiger"}


def test_vocabulary_forms(tmp_path):
    f = tmp_path / "v.txt"
    f.write_text("Traffic_Light\nwheel\n")
    assert load_vocabulary(str(f)) == ["traffic light", "wheel"]
    assert load_vocabulary("cat, dog") == ["cat", "dog"]
    assert len(load_vocabulary("objects365")) == 365 and len(load_vocabulary("ade20k")) == 100


def test_bad_inputs_get_one_clear_message(checkpoint, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    base = ["--images", str(PHOTO), "--output", str(tmp_path / "o")]
    assert predict_main(["--checkpoint", str(checkpoint), "--vocab", str(empty), *base]) == 2
    assert "empty.txt' is empty" in capsys.readouterr().err
    import torch

    from ssam.model.sam import build_sam

    torch.save(build_sam("smoke").state_dict(), tmp_path / "sam.pth")
    assert predict_main(["--checkpoint", str(tmp_path / "sam.pth"), "--vocab", "coco", *base]) == 2
    assert "sam.pth: a SAM state dict" in capsys.readouterr().err
    assert predict_main(["--checkpoint", str(tmp_path / "nope.pt"), "--vocab", "coco", *base]) == 2
    assert "nope.pt: no such checkpoint" in capsys.readouterr().err
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"<html>not an image</html>")
    code = predict_main(
        [
            "--checkpoint",
            str(checkpoint),
            "--vocab",
            "coco",
            "--images",
            str(bad),
            str(PHOTO),
            "--output",
            str(tmp_path / "p"),
            *LOOSE,
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "bad.jpg: cannot read image" in err
    assert (
        len(json.loads((tmp_path / "p/predictions.json").read_text())["images"]) == 1
    )  # the good one was done
    assert (
        predict_main(
            ["--checkpoint", str(checkpoint), "--vocab", "coco", "--images", str(PHOTO), "--boxes", "5,5,1,1"]
        )
        == 2
    )


def test_eval_on_a_tiny_gt_set(checkpoint, tmp_path, capsys):
    gt = write_coco(tmp_path / "coco", images=3, seed=5)
    out = tmp_path / "metrics.json"
    code = eval_main(
        [
            "--checkpoint",
            str(checkpoint),
            "--coco",
            str(gt),
            "--images",
            str(tmp_path / "coco/images"),
            "--output",
            str(out),
            *LOOSE,
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0 and "mask_AP50" in printed and "agnostic_AR@100" in printed
    result = json.loads(out.read_text())
    assert result["images"] == 3 and result["detections"] > 0
    assert all(0.0 <= result[k] <= 1.0 for k in ("mask_AP", "mask_AP50", "agnostic_AR@100"))
    assert np.isfinite(result["mask_AP"])
    assert "label accuracy" in printed and "IoU calib. error" in printed
    assert 0.0 <= result["mean_best_match_iou"] <= 1.0 and result["gt_masks"] > 0
    assert result["matched_masks"] <= result["gt_masks"] and result["iou_calibration_mae"] >= 0.0


def test_match_metrics_on_known_masks():
    from pycocotools import mask as mask_utils

    from ssam.model.predict import match_metrics

    def rle(y0, y1, x0, x1):
        m = np.zeros((20, 20), np.uint8)
        m[y0:y1, x0:x1] = 1
        return mask_utils.encode(np.asfortranarray(m))

    gt = [rle(0, 10, 0, 10), rle(10, 20, 10, 20), rle(0, 4, 16, 20)]
    names = ["square", "disk", "ring"]

    def pred(r, label, iou, score):
        return {
            "segmentation": {"size": r["size"], "counts": r["counts"].decode()},
            "label": label,
            "label_score": score,
            "predicted_iou": iou,
        }

    preds = [pred(rle(0, 10, 0, 10), "square", 0.9, 0.8), pred(rle(10, 20, 10, 15), "Square", 0.5, 0.3)]
    m = match_metrics(gt, names, preds)
    assert m["best_iou"] == pytest.approx([1.0, 0.5, 0.0])
    assert m["label_correct"] == [True, False]  # the third GT mask is unmatched
    assert m["label_prob"] == [0.8, 0.3]
    assert m["iou_error"] == pytest.approx([0.1, 0.0])
    assert match_metrics(gt, names, [])["best_iou"] == [0.0, 0.0, 0.0]


def test_label_reliability_splits_matched_masks_at_the_cut():
    from ssam.model.predict import label_reliability

    r = label_reliability([0.9, 0.7, 0.6, 0.2, 0.1], [True, True, False, False, True])
    assert r["score>=0.5"] == {"masks": 3, "accuracy": pytest.approx(2 / 3)}
    assert r["score<0.5"] == {"masks": 2, "accuracy": 0.5}
    assert label_reliability([], [])["score>=0.5"] == {"masks": 0, "accuracy": None}


def test_automatic_thresholds_come_from_the_checkpoint_unless_a_flag_is_given(tmp_path):
    import argparse

    from ssam.model.cli import _add_generator_flags, _predict_options
    from ssam.model.predict import PredictOptions, automatic_settings, load_for_prediction

    clip = {"name": "ssam-smoke-clip", "pretrained": None, "seed": 0, "embed_dim": 32, "smoke": True}
    model = build_semantic_sam("smoke", 32, seed=1)
    recorded = {"pred_iou_thresh": 0.3, "stability_score_thresh": 0.6}
    save_model(tmp_path / "new.pt", model, clip, extra={"predict_defaults": recorded})
    save_model(tmp_path / "old.pt", model, clip)  # written before checkpoints recorded thresholds
    p = argparse.ArgumentParser()
    _add_generator_flags(p)
    new = load_for_prediction(str(tmp_path / "new.pt"), "cat,dog")
    old = load_for_prediction(str(tmp_path / "old.pt"), "cat,dog")

    def thresholds(loaded, opts):
        s = automatic_settings(loaded, opts)
        return s.pred_iou_thresh, s.stability_score_thresh

    assert thresholds(new, _predict_options(p.parse_args([]))) == (0.3, 0.6)
    assert thresholds(new, _predict_options(p.parse_args(["--pred-iou-thresh", "0.7"]))) == (0.7, 0.6)
    assert thresholds(old, _predict_options(p.parse_args([]))) == (0.88, 0.95)  # SAM's
    assert thresholds(new, PredictOptions(from_checkpoint=())) == (0.88, 0.95)


def test_cpu_bf16_flag_runs_the_engine_in_bf16_on_a_cpu_that_has_it(checkpoint, tmp_path, monkeypatch):
    """``--cpu-bf16`` (off by default): the bf16 decoder copy and encoder autocast, as on CUDA, on a
    CPU with bf16 in hardware (forced here so the path runs on any CPU); predictions still written."""
    import ssam.device as devices
    import ssam.model.amg as amg

    copies = []
    real = amg.bf16_decoder
    monkeypatch.setattr(amg, "bf16_decoder", lambda model: copies.append(1) or real(model))
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: True)
    base = ["--checkpoint", str(checkpoint), "--images", str(PHOTO), "--vocab", "coco", "--device", "cpu"]
    base += ["--min-label-score", "0", *LOOSE]
    assert predict_main([*base, "--output", str(tmp_path / "fp32")]) == 0 and copies == []
    assert predict_main([*base, "--output", str(tmp_path / "bf16"), "--cpu-bf16"]) == 0 and copies == [1]
    preds = json.loads((tmp_path / "bf16" / "predictions.json").read_text())
    assert preds["annotations"] and preds["info"]["smoke"] is True
