"""``ssam-pipeline export``: COCO JSON that pycocotools loads, and the shards in HF datasets / webdataset."""

import argparse
import json

import numpy as np
import pytest
import runfixtures
from PIL import Image
from pycocotools.coco import COCO

from ssam.format import complete_shards, iter_run_samples
from ssam.overlay import decode_rle
from ssam.pipeline.export import export_coco, export_hf
from ssam.pipeline.export_cli import add_parser, main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return runfixtures.smoke_run(tmp_path_factory)


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    return main(parser.parse_args(["export", *argv]))


def shard_tars(run_dir) -> list[str]:
    return [str(run_dir / "shards" / f"{s:05d}.tar") for s in complete_shards(run_dir / "shards")]


@pytest.mark.slow
@pytest.mark.parametrize("include_unlabelled", [False, True])
def test_coco_loads_in_pycocotools_and_matches_the_shards(run_dir, tmp_path, include_unlabelled):
    flags = ["--include-unlabelled"] if include_unlabelled else []
    assert cli(str(run_dir), str(tmp_path), "--format", "coco", *flags) == 0
    coco = COCO(str(tmp_path / "instances.json"))
    samples = {key: meta for key, meta, _ in iter_run_samples(run_dir)}
    kept = [(k, a) for k, m in samples.items() for a in m["annotations"] if a["label"] or include_unlabelled]
    assert len(coco.getImgIds()) == len(samples) == 12
    assert len(coco.getAnnIds()) == len(kept) > 0
    names = {c["name"] for c in coco.loadCats(coco.getCatIds())}
    assert names == {a["label"] or "unlabelled" for _, a in kept}
    for ann in coco.loadAnns(coco.getAnnIds()):
        img = coco.imgs[ann["image_id"]]
        ours = samples[img["ssam_key"]]["annotations"][ann["ssam_ann_id"]]
        mask = coco.annToMask(ann)
        assert mask.shape == (img["height"], img["width"])
        assert mask.sum() == ann["area"] == ours["area"]
        assert np.array_equal(mask.astype(bool), decode_rle(ours["segmentation"]))
        assert coco.cats[ann["category_id"]]["name"] == (ours["label"] or "unlabelled")
    for img in coco.loadImgs(coco.getImgIds()):
        assert Image.open(tmp_path / "images" / img["file_name"]).size == (img["width"], img["height"])


@pytest.mark.slow
def test_hf_folder_loads_with_datasets(run_dir, tmp_path):
    from datasets import load_dataset

    assert cli(str(run_dir), str(tmp_path / "hf"), "--format", "hf") == 0
    ds = load_dataset(str(tmp_path / "hf"), split="train")
    samples = {key: meta for key, meta, _ in iter_run_samples(run_dir)}
    assert sorted(ds["__key__"]) == sorted(samples)
    row = ds[0]
    meta = samples[row["__key__"]]
    assert row["jpg"].size == (meta["image"]["width"], meta["image"]["height"])
    assert row["json"]["annotations"] == [dict(a) for a in meta["annotations"]]
    assert np.asarray(row["emb.npy"]).shape == (len(meta["annotations"]), 32)


@pytest.mark.slow
def test_datasets_webdataset_builder_reads_the_shards(run_dir):
    from datasets import load_dataset

    ds = load_dataset("webdataset", data_files={"train": shard_tars(run_dir)}, split="train")
    assert len(ds) == 12 and set(ds.column_names) >= {"jpg", "json", "emb.npy", "__key__"}


@pytest.mark.slow
def test_webdataset_reads_the_shards(run_dir):
    import webdataset as wds

    samples = {key: meta for key, meta, _ in iter_run_samples(run_dir)}
    seen = {}
    for sample in wds.WebDataset(shard_tars(run_dir), shardshuffle=False).decode("pil"):
        seen[sample["__key__"]] = sample
        assert sample["jpg"].size == (sample["json"]["image"]["width"], sample["json"]["image"]["height"])
        assert sample["emb.npy"].dtype == np.float16
    assert {k: s["json"] for k, s in seen.items()} == samples


def test_hf_features_survive_columns_null_in_the_first_shard(tmp_path):
    """Shard 0 has ``template`` null everywhere, shard 1 an int: schema inference alone breaks on it."""
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    run = runfixtures.write_synthetic_run(tmp_path / "run")
    with pytest.raises(DatasetGenerationError):
        load_dataset(
            "webdataset", data_files={"train": shard_tars(run)}, split="train", cache_dir=str(tmp_path / "c")
        )
    export_hf(run, tmp_path / "hf")
    ds = load_dataset(str(tmp_path / "hf"), split="train", cache_dir=str(tmp_path / "c2"))
    assert [c["template"] for c in ds[1]["json"]["candidates"]] == [None, 0]
    assert ds[1]["emb.npy"] is None  # this run kept no embeddings


def test_coco_categories_from_labels(tmp_path):
    run = runfixtures.write_synthetic_run(tmp_path / "run")
    summary = export_coco(run, tmp_path / "coco", images=False)
    assert summary.images == 2 and summary.annotations == 4 and summary.skipped_unlabelled == 1
    data = json.loads((tmp_path / "coco" / "instances.json").read_text())
    assert data["categories"] == [
        {"id": 1, "name": "dog", "supercategory": "", "vocab_id": 378, "source": "caption"},
        {"id": 2, "name": "leash", "supercategory": "", "vocab_id": 616, "source": "llm"},
    ]
    assert not (tmp_path / "coco" / "images").exists()
    assert [a["id"] for a in data["annotations"]] == [1, 2, 3, 4]
    assert data["info"]["smoke"] is False
