import pytest
import torch
from segment_anything import build_sam_vit_b

from ssam.model.semantic_sam import (
    CheckpointError,
    MaskShape,
    SemanticSam,
    build_semantic_sam,
    load_model,
    load_sam_weights,
    read_checkpoint,
    save_model,
)


@pytest.fixture(scope="module")
def vit_b_sam_file(tmp_path_factory):
    """A real-architecture SAM vit_b state dict (random weights), saved as the official files are."""
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_random.pth"
    torch.manual_seed(0)
    torch.save(build_sam_vit_b().state_dict(), path)
    return path


def test_sam_vit_b_checkpoint_fills_every_sam_parameter_and_only_new_ones_are_missing(vit_b_sam_file):
    state = torch.load(vit_b_sam_file, map_location="cpu", weights_only=True)
    model = build_semantic_sam("vit_b", clip_dim=512)
    missing = load_sam_weights(model, state, str(vit_b_sam_file))
    assert missing == SemanticSam.new_parameter_names(model)
    assert missing == {"logit_scale"} | {
        n
        for n, _ in model.named_parameters()
        if n.startswith(("mask_decoder.semantic_", "mask_decoder.score_", "mask_decoder.mask_shape."))
    }
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items())


def test_wrong_sam_checkpoints_are_errors_naming_the_keys(vit_b_sam_file):
    vit_b = torch.load(vit_b_sam_file, map_location="cpu", weights_only=True)
    with pytest.raises(CheckpointError, match=r"shapes do not match this model \(smoke\): image_encoder"):
        load_sam_weights(build_semantic_sam("smoke", 32), vit_b, "vit_b.pth")
    from ssam.model.sam import build_sam

    smoke = build_sam("smoke").state_dict()
    del smoke["mask_decoder.iou_token.weight"]
    smoke["extra.weight"] = torch.zeros(1)
    with pytest.raises(
        CheckpointError,
        match=r"unexpected keys \['extra.weight'\], missing SAM keys \['mask_decoder.iou_token.weight'\]",
    ):
        load_sam_weights(build_semantic_sam("smoke", 32), smoke, "x.pth")


def test_outputs_per_prompt():
    model = build_semantic_sam("smoke", clip_dim=32).eval()
    feats = model.image_encoder(torch.zeros(1, 3, 256, 256))
    masks, iou, sem, score = model.decode(feats, boxes=torch.tensor([[10.0, 10, 120, 90], [0, 0, 40, 40]]))
    assert (
        masks.shape == (2, 4, 64, 64)
        and iou.shape == (2, 4)
        and sem.shape == (2, 4, 32)
        and score.shape == (2, 4)
    )
    torch.testing.assert_close(sem.norm(dim=-1), torch.ones(2, 4))
    outs, scale = model(
        torch.zeros(2, 3, 256, 256),
        [
            (torch.tensor([[1.0, 1, 50, 50]]), torch.tensor([[20.0, 20], [30, 30]])),
            (None, torch.tensor([[5.0, 5]])),
        ],
    )
    assert [o[0].shape[0] for o in outs] == [3, 1] and torch.isclose(scale, model.logit_scale.exp())


def test_the_training_forward_decodes_every_image_as_one_image_at_a_time_does():
    """forward() decodes all images' prompts in one call; each image gets what decoding its boxes,
    then its points, on its own features gives (images with boxes only, points only, both, none),
    and gradients reach every image's features."""
    torch.manual_seed(0)
    model = build_semantic_sam("smoke", clip_dim=32).train()
    images = torch.randn(4, 3, 256, 256)
    prompts = [
        (
            torch.tensor([[1.0, 2, 130, 90], [40, 40, 200, 250]]),
            torch.tensor([[20.0, 20], [99, 3], [250, 250]]),
        ),
        (None, torch.tensor([[5.0, 5]])),
        (torch.tensor([[0.0, 0, 255, 255]]), None),
        (torch.zeros(0, 4), torch.zeros(0, 2)),
    ]
    outs, _ = model(images, prompts)
    feats = model.image_encoder(images)
    for b, (boxes, points) in enumerate(prompts):
        parts = []
        if boxes is not None and len(boxes):
            parts.append(model.decode(feats[b : b + 1], boxes=boxes))
        if points is not None and len(points):
            ones = torch.ones(len(points), 1, dtype=torch.int)
            parts.append(model.decode(feats[b : b + 1], points=(points[:, None], ones)))
        if not parts:
            assert all(len(t) == 0 for t in outs[b])
            continue
        for got, want in zip(outs[b], (torch.cat(t) for t in zip(*parts, strict=True)), strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    images.requires_grad_(True)
    outs, _ = model(images, prompts)
    sum(t.sum() for out in outs for t in out).backward()
    assert [bool(images.grad[b].abs().sum() > 0) for b in range(4)] == [True, True, True, False]


def test_checkpoint_round_trip_and_refusals(tmp_path, vit_b_sam_file):
    model = build_semantic_sam("smoke", clip_dim=32, seed=4).eval()
    save_model(tmp_path / "m.pt", model, {"name": "ssam-smoke-clip", "pretrained": None, "seed": 0})
    loaded, payload = load_model(tmp_path / "m.pt")
    assert payload["model_config"] == {"sam_size": "smoke", "clip_dim": 32}
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=k)
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left nothing behind
    with pytest.raises(CheckpointError, match="a SAM state dict"):
        read_checkpoint(vit_b_sam_file)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt: not a loadable checkpoint"):
        read_checkpoint(tmp_path / "junk.pt")
    torch.save({"format": "ssam-semantic-sam", "evil": torch.nn.Linear(1, 1)}, tmp_path / "pickle.pt")
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):  # weights_only refuses objects
        read_checkpoint(tmp_path / "pickle.pt")
    bigger = build_semantic_sam("smoke", clip_dim=64)
    save_model(tmp_path / "b.pt", bigger, {})
    payload = torch.load(tmp_path / "b.pt", weights_only=True)
    payload["model_config"]["clip_dim"] = 32
    torch.save(payload, tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="weights do not fit a smoke model"):
        load_model(tmp_path / "b.pt")


def _disk(side: int, cx: float, cy: float, r: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(side) + 0.5, torch.arange(side) + 0.5, indexing="ij")
    return ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r).float()


def test_mask_shape_sees_the_outline_not_where_or_how_large():
    """The semantic head's mask input: a disk anywhere and at any size looks alike, a square does
    not; an empty mask is read over the whole frame (no NaN); untrained, it adds nothing."""
    torch.manual_seed(0)
    shape = MaskShape(32)
    logits = lambda m: (m * 2 - 1) * 8  # noqa: E731 -- {0, 1} masks as confident logits
    assert shape(logits(_disk(64, 20, 20, 10))[None, None]).abs().max() == 0  # zero-initialised last layer
    torch.nn.init.normal_(shape.mlp[2].weight)
    square = torch.zeros(64, 64)
    square[10:40, 20:50] = 1
    masks = torch.stack([_disk(64, 20, 20, 10), _disk(64, 40, 35, 20), square, torch.zeros(64, 64)])
    out = shape(logits(masks)[None])[0]
    assert torch.isfinite(out).all() and out.shape == (4, 32)
    small_vs_large = (out[0] - out[1]).norm()
    assert small_vs_large < 0.2 * (out[0] - out[2]).norm()


def test_a_checkpoint_from_before_mask_shape_loads_and_predicts_as_it_did(tmp_path):
    model = build_semantic_sam("smoke", clip_dim=32, seed=4).eval()  # untrained: MaskShape adds nothing
    save_model(tmp_path / "m.pt", model, {})
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["state_dict"] = {k: v for k, v in payload["state_dict"].items() if ".mask_shape." not in k}
    torch.save(payload, tmp_path / "old.pt")
    old, _ = load_model(tmp_path / "old.pt")
    assert all(
        v.abs().max() == 0
        for k, v in old.state_dict().items()
        if k.startswith("mask_decoder.mask_shape.mlp.2")
    )
    image = torch.randn(1, 3, 256, 256)
    prompts = [(torch.tensor([[20.0, 30.0, 120.0, 140.0]]), torch.tensor([[60.0, 70.0]]))]
    with torch.no_grad():
        want, _ = model(image, prompts)
        got, _ = old(image, prompts)
    for a, b in zip(want[0], got[0], strict=True):
        torch.testing.assert_close(a, b)
