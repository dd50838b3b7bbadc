"""The automatic-mask engine against segment-anything's own SamAutomaticMaskGenerator (untouched).

The smoke SAM's random decoder draws near-whole-image masks (logits ~0.03, every box the whole
image), so NMS leaves one mask per image and crops, edges and cleanup go untested. Most tests
therefore use ``local_sam``: the smoke SAM (its encoder, prompt encoder and token embeddings)
whose decoder's inner modules are replaced by analytic ones that draw a disc around each point
prompt, cut by the image's encoder features. Reference and engine call the same modules, so
both must agree; the unmodified smoke SAM and a Semantic-SAM are tested as well.
"""

import copy
import math
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.modeling import Sam
from segment_anything.utils.amg import batched_mask_to_box, build_all_layer_point_grids
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn

from ssam.model.amg import (
    AmgSettings,
    MaskEngine,
    bf16_decoder,
    boxes_and_areas,
    decode_prompts,
    masks_to_coco_rles,
    resize_image,
    resize_longest_side,
    rle_runs,
    sam_image_features,
    take_runs,
    upscale_logits,
)
from ssam.model.sam import build_sam
from ssam.model.sdpa import encoder_attention_forward
from ssam.model.semantic_sam import build_semantic_sam
from ssam.overlay import decode_rles

_FREQ = 0.2  # prompt PE frequency small enough that atan2 recovers the point from its token
_SHARP, _CUT = 2000.0, 300.0  # logit slope of the disc; weight of the feature difference
_RADII = (0.12, 0.05, 0.1, 0.2)  # disc radius per output, in the padded input square (0..1)


def _feature_bhw(src_bchw, direction):
    return torch.einsum("bchw,c->bhw", src_bchw, direction)


class _PointTransformer(nn.Module):
    """Stands in for the two-way transformer: output tokens carry the point (x, y) and its feature."""

    def __init__(self, direction):
        super().__init__()
        self.register_buffer("direction", direction)

    def forward(self, image_embedding, image_pe, point_embedding):
        half = image_embedding.shape[1] // 2
        tok = point_embedding[:, 5]  # after the IoU token and four mask tokens: the point, PE only
        xy = (torch.atan2(tok[:, :2], tok[:, half : half + 2]) / (2 * math.pi * _FREQ) + 1) / 2
        feat = _feature_bhw(image_embedding, self.direction)[:, None]
        at_point = F.grid_sample(feat, (2 * xy - 1)[:, None, None], align_corners=False)[:, 0, 0, 0]
        hs = torch.zeros_like(point_embedding)
        hs[:, :5, :2], hs[:, :5, 2] = xy[:, None], at_point[:, None]
        return hs, image_embedding.flatten(2).transpose(1, 2).contiguous()


class _Basis(nn.Module):
    """Stands in for output upscaling: per low-res pixel [1, x, y, x^2+y^2, f^2, f]."""

    def __init__(self, direction):
        super().__init__()
        self.register_buffer("direction", direction)

    def forward(self, src):
        _, _, h, w = src.shape
        f = F.interpolate(_feature_bhw(src, self.direction)[:, None], scale_factor=4, mode="bilinear")[:, 0]
        ys, xs = ((torch.arange(4 * n, device=src.device) + 0.5) / (4 * n) for n in (h, w))
        y, x = torch.meshgrid(ys, xs, indexing="ij")
        pos = torch.stack([torch.ones_like(x), x, y, x * x + y * y])[None].expand(len(src), -1, -1, -1)
        return torch.cat([pos, (f * f)[:, None], f[:, None]], 1)


class _Disc(nn.Module):
    """Stands in for a hypernetwork MLP: logit = s (r^2 - |x - p|^2) - c (f - f_p)^2 on the basis."""

    def __init__(self, radius):
        super().__init__()
        self.radius = radius

    def forward(self, tok):
        px, py, fp = tok[:, 0], tok[:, 1], tok[:, 2]
        s, c, one = _SHARP, _CUT, torch.ones_like(px)
        const = s * self.radius**2 - s * (px * px + py * py) - c * fp * fp
        return torch.stack([const, 2 * s * px, 2 * s * py, -s * one, -c * one, 2 * c * fp], 1)


class _Iou(nn.Module):
    """Stands in for the IoU head: a deterministic value in [0.05, 0.95] per point and output."""

    def forward(self, tok):
        return 0.5 + 0.45 * torch.sin(
            40 * tok[:, :1] + 70 * tok[:, 1:2] + 1.3 * torch.arange(4, device=tok.device)
        )


def local_sam():
    sam = build_sam("smoke", seed=0)
    c = sam.prompt_encoder.embed_dim
    with torch.no_grad():
        sam.prompt_encoder.point_embeddings[1].weight.zero_()
        freq = torch.zeros(2, c // 2)
        freq[0, 0] = freq[1, 1] = _FREQ
        sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.copy_(freq)
    direction = F.normalize(torch.randn(c, generator=torch.Generator().manual_seed(1)), dim=0)
    dec = sam.mask_decoder
    dec.transformer, dec.output_upscaling = _PointTransformer(direction), _Basis(direction)
    dec.output_hypernetworks_mlps = nn.ModuleList(_Disc(r) for r in _RADII)
    dec.iou_prediction_head = _Iou()
    return sam.eval()


def photo(name, side=256):
    im = getattr(skimage.data, name)()
    h, w = im.shape[:2]
    return np.asarray(Image.fromarray(im).resize((round(w * side / max(h, w)), round(h * side / max(h, w)))))


@pytest.fixture(scope="module")
def photos():
    return [photo("astronaut"), photo("coffee"), photo("chelsea")]


@pytest.fixture(scope="module")
def toy():
    return local_sam()


LOCAL = dict(points_per_side=12, pred_iou_thresh=0.5, stability_score_thresh=0.8)


FIELDS = {"segmentation", "bbox", "area", "predicted_iou", "stability_score", "point_coords", "crop_box"}


def share_matched(a, b, thresh=0.9):
    """Share of records ``a`` whose mask has IoU >= thresh with some mask of ``b``."""
    if not a or not b:
        return float(not a and not b)
    iou = mask_utils.iou([r["segmentation"] for r in a], [r["segmentation"] for r in b], [0] * len(b))
    return float((np.asarray(iou).max(1) >= thresh).mean())


def mask_iou(a, b):
    return float(mask_utils.iou([a], [b], [0])[0, 0])


def assert_equivalent(ref, out, min_share=0.95):
    assert abs(len(ref) - len(out)) <= max(1, 0.02 * len(ref)), (len(ref), len(out))
    assert share_matched(ref, out) >= min_share and share_matched(out, ref) >= min_share
    for r in out:
        assert set(r) == FIELDS
        assert r["area"] == mask_utils.area(r["segmentation"]) and r["area"] >= 0
        assert np.allclose(r["bbox"], mask_utils.toBbox(r["segmentation"]) - [0, 0, 1, 1])


@pytest.mark.parametrize(
    "extra",
    [{}, {"min_mask_region_area": 60}, {"crop_n_layers": 1}],
    ids=["plain", "small_regions", "crops"],
)
def test_matches_segment_anything_generator_on_photos(toy, photos, extra):
    settings = {**LOCAL, **extra}
    # a model of its own: an engine switches the attention of the model it runs to SDPA (toy's, here)
    reference = SamAutomaticMaskGenerator(local_sam(), output_mode="coco_rle", **settings)
    # 100 prompts per decoder call: calls straddle images, and some crops' sub-batches lose every mask.
    engine = MaskEngine(toy, AmgSettings(min_mask_area=0, max_masks=10_000, points_per_batch=100, **settings))
    results = engine.generate(photos)
    for im, res in zip(photos, results, strict=True):
        ref = reference.generate(im)
        assert len(ref) > 30, "the test needs masks to compare"
        assert_equivalent(ref, res.records)
        if "crop_n_layers" in extra:
            assert len({tuple(r["crop_box"]) for r in res.records}) > 1
        ious = [r["predicted_iou"] for r in res.records]
        assert ious == sorted(ious, reverse=True)


def test_matches_generator_with_the_unmodified_smoke_sam(photos):
    """Random masks span the image: NMS off (1.0) keeps them all, each compared with its twin."""
    sam = build_sam("smoke", seed=0)
    settings = dict(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.5)
    settings.update(stability_score_offset=0.01, box_nms_thresh=1.0)
    reference = SamAutomaticMaskGenerator(sam, output_mode="coco_rle", **settings)
    engine = MaskEngine(copy.deepcopy(sam), AmgSettings(min_mask_area=0, max_masks=10_000, **settings))
    # the engine runs SAM's attention through SDPA (model/sdpa.py), on its own model instance only
    assert engine.model.image_encoder.blocks[0].attn.forward.__func__ is encoder_attention_forward
    assert "forward" not in vars(sam.image_encoder.blocks[0].attn)  # the reference's: untouched
    for im, res in zip(photos[:2], engine.generate(photos[:2]), strict=True):
        ref = reference.generate(im)
        assert len(ref) > 20
        assert_equivalent(ref, res.records)

        def key(r):
            return (*np.round(r["point_coords"][0], 3), round(r["predicted_iou"], 5))

        twins = {key(r): r["segmentation"] for r in ref}
        same = [key(r) in twins and mask_iou(r["segmentation"], twins[key(r)]) >= 0.99 for r in res.records]
        assert np.mean(same) >= 0.98


def test_several_images_in_one_call_equal_one_at_a_time(toy, photos):
    # 144 points per image, 100 per decoder call: calls straddle images.
    engine = MaskEngine(toy, AmgSettings(points_per_batch=100, **LOCAL))
    together = engine.generate(photos)
    for im, res in zip(photos, together, strict=True):
        (alone,) = MaskEngine(toy, AmgSettings(**LOCAL)).generate([im])
        assert len(res.records) == len(alone.records) > 0
        assert share_matched(res.records, alone.records, 0.99) == 1.0
        a = [(r["predicted_iou"], r["point_coords"]) for r in res.records]
        assert a == [(r["predicted_iou"], r["point_coords"]) for r in alone.records]


def test_the_cpu_decoder_runs_a_few_prompts_at_a_time(toy, photos, monkeypatch):
    """On a CPU the engine's decoder calls run in chunks of prompts whose tensors fit
    CPU_DECODER_CHUNK_BYTES: the same masks as in one piece, calls straddling images included."""
    from ssam.model import amg

    settings = AmgSettings(points_per_batch=100, **LOCAL)
    whole = MaskEngine(toy, settings).generate(photos[:2])
    sizes = {"tokens": [], "masks": []}
    tokens, masks = amg.decoder_tokens, amg.decoder_masks

    def counted_tokens(dec, features, pe, sparse, dense):
        sizes["tokens"].append((sparse.shape[0], features.shape[0]))
        return tokens(dec, features, pe, sparse, dense)

    def counted_masks(dec, hs, src, hw):
        sizes["masks"].append(src.shape[0])
        return masks(dec, hs, src, hw)

    monkeypatch.setattr(amg, "decoder_tokens", counted_tokens)
    monkeypatch.setattr(amg, "decoder_masks", counted_masks)
    image_tokens = 32 * 16 * 16 * 4  # one prompt's: the smoke SAM's 16x16 embedding, 32 wide, float32
    monkeypatch.setattr(amg, "CPU_DECODER_CHUNK_BYTES", 7 * image_tokens)
    parts = MaskEngine(toy, settings).generate(photos[:2])
    # 7 prompts per transformer call; a call straddling two images brings each prompt's embedding
    assert max(p for p, _ in sizes["tokens"]) == 7 and any(f == p > 1 for p, f in sizes["tokens"])
    assert max(sizes["masks"]) == 3  # upscaled: 16 x 256 pixels x 4 channels per prompt, 2x the tokens
    for a, b in zip(whole, parts, strict=True):
        assert len(a.records) == len(b.records) > 0
        assert share_matched(a.records, b.records, 0.99) == 1.0
        np.testing.assert_allclose(
            [r["predicted_iou"] for r in a.records], [r["predicted_iou"] for r in b.records], rtol=1e-5
        )


def test_precomputed_features_and_returned_masks(toy, photos):
    engine = MaskEngine(toy, AmgSettings(max_masks=5, **LOCAL))
    feats = engine.encode(photos[:2])
    assert feats[0].shape == (1, 32, 16, 16)
    given = engine.generate(photos[:2], features=feats, return_masks=True)
    own = engine.generate(photos[:2])
    for im, g, o in zip(photos[:2], given, own, strict=True):
        assert g.records == o.records and len(g.records) == 5 and g.semantic is None
        assert g.masks.shape == (5, *im.shape[:2]) and g.masks.dtype == bool
        assert [int(m.sum()) for m in g.masks] == [r["area"] for r in g.records]
        assert np.array_equal(
            g.masks, decode_rles([r["segmentation"] for r in g.records], *im.shape[:2]).astype(bool)
        )


@pytest.mark.parametrize("target", [1024, 300, 64])
def test_resize_is_segment_anythings_pil_resize(photos, target):
    """The engine's torch resize gives the image segment-anything's PIL resize gives (SAM's input),
    up and down, whole images and crops (non-contiguous views)."""
    transform = ResizeLongestSide(target)
    for im in [*photos, photos[0][40:400:, 17:333], photos[1][::2]]:
        ours = resize_longest_side(im, target, torch.device("cpu"))
        pil = torch.from_numpy(transform.apply_image(np.ascontiguousarray(im))).permute(2, 0, 1)[None]
        assert ours.shape == pil.shape and ours.dtype == torch.float32
        diff = (ours - pil.float()).abs()
        assert diff.max() <= 2 and diff.mean() < 0.05, (im.shape, target, diff.max(), diff.mean())


def test_resize_keeps_a_same_size_image_and_refuses_other_dtypes(photos):
    im = photos[0]
    same = resize_image(im, im.shape[:2], torch.device("cpu"))
    assert torch.equal(same[0].permute(1, 2, 0), torch.from_numpy(im.copy()).float())
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        resize_image(im.astype(np.float32), (10, 10), torch.device("cpu"))
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        resize_image(im[..., 0], (10, 10), torch.device("cpu"))


def test_flat_gray_image_gives_no_empty_or_degenerate_mask():
    sam = build_sam("smoke", seed=0)
    gray = np.full((200, 300, 3), 128, np.uint8)
    settings = dict(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    reference = SamAutomaticMaskGenerator(sam, output_mode="coco_rle", **settings).generate(gray)
    (keep_all,) = MaskEngine(sam, AmgSettings(min_mask_area=0, **settings)).generate([gray])
    assert any(r["area"] == 0 for r in reference), "the test needs the empty masks the generator keeps"
    assert len(reference) < 256
    assert sorted(r["area"] for r in keep_all.records) == sorted(r["area"] for r in reference)
    (res,) = MaskEngine(sam, AmgSettings(**settings)).generate([gray])
    assert all(r["area"] >= 16 and r["bbox"] != [0.0, 0.0, 0.0, 0.0] for r in res.records)
    assert len(res.records) == sum(r["area"] >= 16 for r in reference)


@pytest.mark.parametrize("sam_size", ["smoke", "vit_b"])
def test_upscaled_logits_are_segment_anythings_postprocess_masks(sam_size):
    """Every image size a SAM of this input side meets: larger than it, at it (the pipeline stores
    large images at 1024), and smaller (where a CPU takes the separable product)."""
    side = {"smoke": 256, "vit_b": 1024}[sam_size]
    sam = SimpleNamespace(image_encoder=SimpleNamespace(img_size=side))
    reference = partial(Sam.postprocess_masks, sam)
    g = torch.Generator().manual_seed(0)
    low = torch.randn(5, side // 4, side // 4, generator=g) * 4
    sizes = [(side, side), (side, side * 3 // 4), (side * 2 // 3, side), (side * 2, side * 3 // 2)]
    sizes += [(side // 2, side // 2), (side // 4, side // 3), (side * 3 // 5, side * 4 // 5), (37, 23)]
    separable = 0
    for hw in sizes:
        input_hw = ResizeLongestSide.get_preprocess_shape(*hw, side)
        want = reference(low[:, None], input_hw, hw)[:, 0]
        got = upscale_logits(low, side, input_hw, hw)
        assert got.shape == want.shape == (5, *hw)
        if torch.equal(got, want):
            continue
        separable += 1  # the one path not equal bit for bit: equal to rounding
        assert tuple(hw) != tuple(input_hw), hw  # never at SAM's input side
        assert torch.allclose(got, want, rtol=0, atol=1e-5), hw
        assert ((got > 0) != (want > 0)).float().mean() < 1e-4
    assert separable >= 3, "the small images should take the separable product"
    # other dtypes (bf16 from a CUDA decoder) never take the product: bit for bit at every size
    hw = sizes[-1]
    input_hw = ResizeLongestSide.get_preprocess_shape(*hw, side)
    bf16 = low.bfloat16()
    assert torch.equal(upscale_logits(bf16, side, input_hw, hw), reference(bf16[:, None], input_hw, hw)[:, 0])


def test_boxes_and_areas_are_segment_anythings():
    g = torch.Generator().manual_seed(0)
    blobs = torch.rand(40, 1, 6, 9, generator=g) > 0.75
    masks = F.interpolate(blobs.float(), (61, 90), mode="nearest")[:, 0] > 0.5
    masks[0] = False  # empty
    masks[1] = True  # full
    masks[2] = False
    masks[2, 60, 89] = True  # one pixel in the last corner
    masks[3] = False
    masks[3, 0, 5:9] = True  # one row at the top
    boxes, area = boxes_and_areas(masks)
    assert boxes.dtype == area.dtype == torch.int64
    assert torch.equal(boxes, batched_mask_to_box(masks).long())
    assert torch.equal(area, masks.sum((-2, -1)))
    assert boxes[2].tolist() == [89, 60, 89, 60] and boxes[0].tolist() == [0, 0, 0, 0]
    none, zero = boxes_and_areas(masks[:0])
    assert none.shape == (0, 4) and zero.shape == (0,)


def test_device_rle_equals_pycocotools():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(7, 13, 9, generator=g) > 0.5
    masks[0] = False  # empty
    masks[1] = True  # full
    masks[2] = False
    masks[2, 0, 0] = masks[2, -1, -1] = True  # first and last pixel
    masks[3] = False
    masks[3, 2:9, 3:7] = True  # a rectangle: runs down its columns
    expected = mask_utils.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8)))
    got = masks_to_coco_rles(masks)
    assert got == [{"size": [13, 9], "counts": e["counts"].decode()} for e in expected]
    assert np.array_equal(decode_rles(got, 13, 9).astype(bool), masks.numpy())
    runs, lengths = rle_runs(masks)
    assert lengths.tolist()[:2] == [1, 2] and runs[:3].tolist() == [117, 0, 117]
    sub_runs, sub_lengths = take_runs(runs, lengths, torch.tensor([5, 2]))
    direct_runs, direct_lengths = rle_runs(masks[[5, 2]])
    assert torch.equal(sub_runs, direct_runs) and torch.equal(sub_lengths, direct_lengths)
    assert masks_to_coco_rles(masks[:0]) == []


def test_decode_prompts_with_per_prompt_embeddings_matches_the_mask_decoder(photos):
    sam = build_sam("smoke", seed=0)
    engine = MaskEngine(sam)
    feats = torch.cat(engine.encode(photos[:2]))
    coords = torch.tensor([[[30.0, 40.0]], [[200.0, 100.0]], [[5.0, 250.0]]])
    labels = torch.ones(3, 1, dtype=torch.int)
    image_of_prompt = torch.tensor([0, 1, 1])
    with torch.no_grad():
        masks, iou, sem, score = decode_prompts(sam, feats[image_of_prompt], coords, labels)
        for p, i in enumerate(image_of_prompt.tolist()):
            sparse, dense = sam.prompt_encoder(
                points=(coords[p : p + 1], labels[p : p + 1]), boxes=None, masks=None
            )
            m, q = sam.mask_decoder.predict_masks(
                feats[i : i + 1], sam.prompt_encoder.get_dense_pe(), sparse, dense
            )
            torch.testing.assert_close(masks[p : p + 1], m, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(iou[p : p + 1], q, rtol=1e-4, atol=1e-5)
    assert masks.shape == (3, 4, 64, 64) and sem is None and score is None


@pytest.mark.parametrize("kind", ["sam", "semantic"])
def test_prompts_of_one_image_share_the_first_blocks_image_side_work(kind, photos):
    """decode_prompts with one image embedding for many prompts (model/two_way.py: the first
    block's image side computed once) gives segment-anything's per-prompt outputs."""
    model = build_sam("smoke", seed=0) if kind == "sam" else build_semantic_sam("smoke", clip_dim=24, seed=0)
    feats = MaskEngine(model).encode(photos[:1])[0]
    coords = torch.rand(24, 1, 2, generator=torch.Generator().manual_seed(0)) * 256
    labels = torch.ones(24, 1, dtype=torch.int)
    with torch.no_grad():
        got = decode_prompts(model, feats, coords, labels)
        ref = decode_prompts(model, feats.expand(24, -1, -1, -1).contiguous(), coords, labels)
        if kind == "sam":  # and segment-anything's own decoder, prompt by prompt
            sparse, dense = model.prompt_encoder(points=(coords[:3], labels[:3]), boxes=None, masks=None)
            m, q = model.mask_decoder.predict_masks(feats, model.prompt_encoder.get_dense_pe(), sparse, dense)
            torch.testing.assert_close(got[0][:3], m, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got[1][:3], q, rtol=1e-4, atol=1e-5)
    for g, r in zip(got, ref, strict=True):
        if r is not None:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_regrouped_attention_is_segment_anythings_attention():
    """model/two_way.py folds the projections of the image side into the prompts' few tokens: in
    float64 the outputs are segment-anything's Attention's to rounding, for per-prompt and shared
    image tokens, with SAM's decoder sizes (256 wide, 8 heads, internal width 128) and biases."""
    from segment_anything.modeling.transformer import Attention

    from ssam.model.two_way import attend_image_keys, attend_image_queries

    torch.manual_seed(0)
    attn = Attention(256, 8, downsample_rate=2).double()
    with torch.no_grad():
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
            lin.bias.normal_()  # the folding must carry every bias, not only zero ones
        tokens, image = torch.randn(5, 7, 256).double(), torch.randn(5, 300, 256).double()
        other = torch.randn(5, 300, 256).double()  # keys and values may differ (keys + positions)
        torch.testing.assert_close(
            attend_image_keys(attn, tokens, image, other),
            attn(q=tokens, k=image, v=other),
            rtol=1e-9,
            atol=1e-9,
        )
        torch.testing.assert_close(
            attend_image_queries(attn, image, tokens, other[:, :7]),
            attn(q=image, k=tokens, v=other[:, :7]),
            rtol=1e-9,
            atol=1e-9,
        )
        shared = image[:1]
        torch.testing.assert_close(
            attend_image_queries(attn, shared, tokens, other[:, :7]),
            attn(q=shared.expand(5, -1, -1), k=tokens, v=other[:, :7]),
            rtol=1e-9,
            atol=1e-9,
        )


def test_upscaling_as_matrix_products_is_segment_anythings_upscaling():
    """model/two_way.py runs the decoder's upscaling (two 2x2 stride-2 transposed convolutions, a
    LayerNorm2d, GELUs) and the hypernetwork product as matrix products with the sub-pixels put in
    place at the end: in float64 segment-anything's MaskDecoder arithmetic to rounding, at SAM's
    sizes (256 channels) on a non-square embedding; with gradients it is segment-anything's own
    module call."""
    from segment_anything.modeling import MaskDecoder
    from segment_anything.modeling.transformer import TwoWayTransformer

    from ssam.model.two_way import upscaled_mask_logits

    torch.manual_seed(0)
    dec = MaskDecoder(transformer_dim=256, transformer=TwoWayTransformer(2, 256, 8, 2048)).double()
    with torch.no_grad():
        for prm in dec.output_upscaling.parameters():
            prm.normal_(0, 0.1)  # LayerNorm's weights and every bias away from 1 and 0
    h, w = 5, 7
    src, hyper = torch.randn(3, h * w, 256).double(), torch.randn(3, 4, 32).double()

    def theirs(src):  # MaskDecoder.predict_masks's last lines
        up = dec.output_upscaling(src.transpose(1, 2).reshape(3, 256, h, w))
        return (hyper @ up.view(3, 32, -1)).view(3, -1, 4 * h, 4 * w)

    with torch.no_grad():
        got = upscaled_mask_logits(dec.output_upscaling, hyper, src, (h, w))
        torch.testing.assert_close(got, theirs(src), rtol=1e-9, atol=1e-9)
    calls = []
    hook = dec.output_upscaling.register_forward_hook(lambda *a: calls.append(1))
    src.requires_grad_(True)
    got = upscaled_mask_logits(dec.output_upscaling, hyper, src, (h, w))
    hook.remove()
    assert calls == [1] and got.requires_grad  # training: the module itself, its gradient
    torch.testing.assert_close(got.detach(), theirs(src).detach(), rtol=1e-9, atol=1e-9)


def test_training_keeps_segment_anythings_transformer_forward(monkeypatch):
    """With gradients (training) two_way_forward runs segment-anything's own forward on P
    materialised copies, as the decoder did before model/two_way.py; without, the shared path,
    which gives the same outputs."""
    from segment_anything.modeling.transformer import TwoWayTransformer

    from ssam.model.two_way import two_way_forward

    torch.manual_seed(0)
    t = build_sam("smoke", seed=0).mask_decoder.transformer
    src, pe, tokens = torch.randn(1, 32, 16, 16), torch.randn(1, 32, 16, 16), torch.randn(5, 7, 32)
    seen = []
    real = TwoWayTransformer.forward

    def spy(self, image_embedding, image_pe, point_embedding):
        seen.append((image_embedding.shape[0], image_embedding.is_contiguous()))
        return real(self, image_embedding, image_pe, point_embedding)

    monkeypatch.setattr(TwoWayTransformer, "forward", spy)
    hs, keys = two_way_forward(t, src, pe, tokens)
    assert seen == [(5, True)] and hs.requires_grad
    with torch.no_grad():
        hs2, keys2 = two_way_forward(t, src, pe, tokens)
    assert seen == [(5, True)]  # the shared path does not call it
    torch.testing.assert_close(hs2, hs.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(keys2, keys.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["sam", "semantic"])
def test_the_bf16_decoder_follows_the_float32_one(kind, photos):
    """The engine's CUDA decoder (a bf16 snapshot, no autocast) run here on the CPU: same dtype
    plumbing, outputs within bf16's precision of the float32 decoder, the model left in float32."""
    torch.manual_seed(0)
    model = build_sam("smoke", seed=0) if kind == "sam" else build_semantic_sam("smoke", clip_dim=24, seed=0)
    model.eval()
    feats = torch.cat(MaskEngine(model).encode(photos[:2]))
    coords = torch.rand(40, 1, 2) * 256
    labels = torch.ones(40, 1, dtype=torch.int)
    image_of_prompt = torch.arange(40) % 2
    dec = bf16_decoder(model)
    with torch.inference_mode():
        ref = decode_prompts(model, feats[image_of_prompt], coords, labels)
        got = decode_prompts(model, feats[image_of_prompt], coords, labels, dec)
    assert got[0].dtype == torch.bfloat16 and model.mask_decoder.iou_token.weight.dtype == torch.float32
    scale = ref[0].abs().mean()
    assert float((got[0].float() - ref[0]).abs().mean()) < 0.02 * float(scale)
    assert float(((got[0] > 0) == (ref[0] > 0)).float().mean()) > 0.98  # the same pixels in the mask
    torch.testing.assert_close(got[1].float(), ref[1], atol=0.02, rtol=0.02)
    if kind == "semantic":
        cos = (got[2].float() * ref[2]).sum(-1)
        assert float(cos.min()) > 0.99
        torch.testing.assert_close(got[3].float(), ref[3], atol=0.02, rtol=0.02)


@pytest.mark.parametrize("part", ["run_tokens", "run_masks"])
def test_a_decoder_that_fails_to_compile_runs_eagerly(toy, photos, caplog, part):
    from ssam.model.amg import cpu_decoder_masks, cpu_decoder_tokens

    calls = []

    def broken(*args):  # what a torch.compile'd function raises when no compiler is there
        calls.append(1)
        raise RuntimeError("backend compiler failed (simulated)")

    engine = MaskEngine(toy, AmgSettings(**LOCAL))
    getattr(engine, part).fn = broken  # as if compiled
    with caplog.at_level("WARNING", logger="ssam.device"):
        (got,) = engine.generate(photos[:1])
    eager = {"run_tokens": cpu_decoder_tokens, "run_masks": cpu_decoder_masks}[part]  # on a CPU
    assert calls == [1] and getattr(engine, part).fn is eager
    assert "running it eagerly" in caplog.text
    assert (
        got.records and got.records == MaskEngine(toy, AmgSettings(**LOCAL)).generate(photos[:1])[0].records
    )

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    getattr(engine, part).fn = out_of_memory  # not a compile failure: the OOM halving handles it
    (failed,) = engine.generate(photos[:1])
    assert failed.failure == "gpu_oom" and getattr(engine, part).fn is out_of_memory


@pytest.mark.parametrize("builder", ["sam", "semantic_sam"])
def test_the_compiled_masks_part_is_one_graph_for_every_batch_size(builder):
    """The IoU gate hands the masks part a different number of prompts each call, 1 included:
    traced once (dynamo's own eager backend: the graph capture, without Inductor's compile)."""
    from ssam.model.amg import decoder_masks, decoder_tokens

    torch.manual_seed(0)
    sam = (build_sam("smoke", seed=0) if builder == "sam" else build_semantic_sam("smoke", 32, seed=0)).eval()
    engine = MaskEngine(sam, AmgSettings(points_per_side=8))
    engine.run_masks.fn = torch.compile(decoder_masks, backend="eager")  # as on CUDA, traced only
    coords, labels = torch.rand(9, 1, 2) * 256, torch.ones(9, 1, dtype=torch.int)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # counted across the process otherwise
    with torch.inference_mode():
        hs, src, _, _ = decode_prompts(sam, torch.randn(1, 32, 16, 16), coords, labels, run=decoder_tokens)
        want = decoder_masks(sam.mask_decoder, hs, src, (16, 16))
        for n in (9, 1, 4, 2, 1, 7):
            got = engine.run_masks(sam.mask_decoder, hs[:n], src[:n], (16, 16))
            assert got[0].shape[0] == n
            for g, w in zip(got, want, strict=True):
                assert (g is None) == (w is None) and (g is None or torch.allclose(g, w[:n], atol=1e-5))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert engine.run_masks.compiled


def test_an_encoder_that_fails_to_compile_runs_eagerly(photos, caplog):
    """masks.compile_encoder (on by default, CUDA only) falls back as the decoder does; a compiled
    module has no truth value, so the engine must not test it with `or` (it once did)."""
    sam = build_sam("smoke", seed=0)
    calls = []

    class Broken(nn.Module):  # raises as a torch.compile'd module does when no compiler is there
        def __len__(self):
            raise TypeError("OptimizedModule does not support len()")

        def forward(self, x):
            calls.append(1)
            raise RuntimeError("backend compiler failed (simulated)")

    class Working(Broken):  # a compiled encoder that works: used, not tested for truth
        def forward(self, x):
            calls.append(0)
            return sam.image_encoder(x)

    engine = MaskEngine(sam)
    assert engine.s.compile_encoder and engine.encoder.fn is sam.image_encoder  # a CPU model: not compiled
    want = engine.encode(photos[:2])
    direct = [f for f, _ in sam_image_features(sam, photos[:2], 4, engine.bf16, Working())]
    assert calls == [0]  # used, not tested for truth
    calls.clear()
    engine.encoder.fn = Working()  # as if compiled
    with caplog.at_level("WARNING", logger="ssam.device"):
        same = engine.encode(photos[:2])
    assert calls == [0] and isinstance(engine.encoder.fn, Working) and "eagerly" not in caplog.text
    calls.clear()
    engine.encoder.fn = Broken()
    with caplog.at_level("WARNING", logger="ssam.device"):
        got = engine.encode(photos[:2])
    assert calls == [1] and engine.encoder.fn is sam.image_encoder and "running it eagerly" in caplog.text
    for g, s_, d, w in zip(got, same, direct, want, strict=True):
        torch.testing.assert_close(g, w)
        torch.testing.assert_close(s_, w)
        torch.testing.assert_close(d, w)


def test_semantic_sam_extras_are_aligned_with_records(photos):
    model = build_semantic_sam("smoke", clip_dim=24, seed=0).eval()
    settings = AmgSettings(
        points_per_side=6,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.3,
        stability_score_offset=0.01,
        box_nms_thresh=1.0,
        max_masks=12,
    )
    engine = MaskEngine(model, settings)
    (res,) = engine.generate(photos[:1], return_masks=True)
    n = len(res.records)
    assert n == 12 and res.semantic.shape == (n, 24) and res.score.shape == (n,) and res.masks.shape[0] == n
    np.testing.assert_allclose(np.linalg.norm(res.semantic, axis=1), 1, rtol=1e-5)
    feats = engine.encode(photos[:1])[0]
    h, w = photos[0].shape[:2]
    for r, sem, score in zip(res.records, res.semantic, res.score, strict=True):
        point = torch.as_tensor(engine.transform.apply_coords(np.array(r["point_coords"]), (h, w)))[None]
        with torch.no_grad():
            _, iou, all_sem, all_score = decode_prompts(
                model, feats, point, torch.ones(1, 1, dtype=torch.int)
            )
        out = int(torch.argmin((iou[0, 1:] - r["predicted_iou"]).abs())) + 1
        assert abs(float(iou[0, out]) - r["predicted_iou"]) < 1e-5
        np.testing.assert_allclose(sem, all_sem[0, out].numpy(), rtol=1e-4, atol=1e-5)
        assert abs(score - float(all_score[0, out])) < 1e-5
    (empty,) = MaskEngine(model, AmgSettings(points_per_side=2)).generate([np.zeros((40, 50, 3), np.uint8)])
    assert empty.records == [] and empty.semantic.shape == (0, 24) and empty.score.shape == (0,)


@pytest.mark.parametrize("kind", ["sam", "semantic"])
def test_only_prompts_with_a_mask_past_the_iou_filter_are_upscaled(kind, toy, photos):
    """The decoder's masks part runs only for prompts with a mask the predicted-IoU filter keeps;
    the results are those of upscaling every prompt (segment-anything's way), semantic outputs
    included."""
    model = toy if kind == "sam" else build_semantic_sam("smoke", clip_dim=24, seed=0).eval()
    settings = dict(points_per_side=12, points_per_batch=50, stability_score_thresh=0.3, box_nms_thresh=0.9)
    # a predicted-IoU threshold that the best mask of about half the prompts passes
    feats = MaskEngine(model, AmgSettings(**settings)).encode(photos[:1])[0]
    coords = torch.rand(64, 1, 2, generator=torch.Generator().manual_seed(0)) * 256
    with torch.no_grad():
        iou = decode_prompts(model, feats, coords, torch.ones(64, 1, dtype=torch.int))[1]
    settings.update(pred_iou_thresh=float(iou[:, 1:].amax(1).median()))
    if kind == "semantic":  # random weights: its masks pass no stability threshold with these
        settings.update(stability_score_thresh=0.0, box_nms_thresh=1.0)
    results, decoded = {}, {}
    for gate in (True, False):
        engine = MaskEngine(model, AmgSettings(**settings))
        engine.gate_masks = gate
        sizes, run = [], engine.run_masks.fn

        def counted(dec, hs, src, hw, sizes=sizes, run=run):
            sizes.append(len(hs))
            return run(dec, hs, src, hw)

        engine.run_masks.fn = counted
        results[gate], decoded[gate] = engine.generate(photos), sum(sizes)
    total = 3 * 12 * 12
    assert decoded[False] == total and 0 < decoded[True] < total * 0.9, decoded
    for a, b in zip(results[True], results[False], strict=True):
        assert a.records and a.records == b.records
        if kind == "semantic":
            np.testing.assert_array_equal(a.semantic, b.semantic)
            np.testing.assert_array_equal(a.score, b.score)


def test_an_image_that_runs_out_of_memory_alone_is_reported(toy, photos):
    class Poisoned(MaskEngine):
        def _generate_group(self, images, features, return_masks):
            if any(im.shape[0] == 7 for im in images):
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return super()._generate_group(images, features, return_masks)

    images = [photos[0], np.zeros((7, 9, 3), np.uint8), photos[1]]
    res = Poisoned(toy, AmgSettings(**LOCAL)).generate(images)
    assert [r.failure for r in res] == [None, "gpu_oom", None]
    assert res[1].records == [] and len(res[0].records) > 0 and len(res[2].records) > 0


def test_settings_defaults_and_point_grids(toy, photos):
    s = AmgSettings()
    assert (s.points_per_side, s.points_per_batch, s.pred_iou_thresh, s.stability_score_thresh) == (
        32,
        64,
        0.88,
        0.95,
    )
    assert (s.stability_score_offset, s.box_nms_thresh, s.crop_n_layers, s.crop_nms_thresh) == (
        1.0,
        0.7,
        0,
        0.7,
    )
    assert (s.crop_overlap_ratio, s.crop_n_points_downscale_factor, s.min_mask_region_area) == (
        512 / 1500,
        1,
        0,
    )
    assert (s.min_mask_area, s.max_masks) == (16, 256)
    assert AmgSettings(max_masks=5) == AmgSettings(max_masks=5) != AmgSettings()
    with pytest.raises(ValueError, match="exactly one"):
        AmgSettings(point_grids=[np.zeros((1, 2))])
    with pytest.raises(ValueError, match="needs 2 grids"):
        AmgSettings(points_per_side=None, point_grids=[np.zeros((1, 2))], crop_n_layers=1)
    grids = build_all_layer_point_grids(12, 0, 1)
    explicit = {k: v for k, v in LOCAL.items() if k != "points_per_side"}
    settings = AmgSettings(points_per_side=None, point_grids=grids, **explicit)
    assert settings == AmgSettings(points_per_side=None, point_grids=[g.copy() for g in grids], **explicit)
    a = MaskEngine(toy, settings).generate(photos[:1])
    assert a[0].records == MaskEngine(toy, AmgSettings(**LOCAL)).generate(photos[:1])[0].records
