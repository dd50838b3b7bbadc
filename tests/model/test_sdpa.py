"""SDPA attention gives SAM's outputs (run on CPU here; the engine switches it on for CUDA)."""

import copy

import torch

from ssam.model.sam import build_sam
from ssam.model.sdpa import enable_sdpa


def test_sdpa_sam_matches_segment_anythings_attention():
    torch.manual_seed(0)
    ref = build_sam("smoke", seed=0).eval()
    for name, p in ref.named_parameters():  # relative positions start at zero: give them values
        if "rel_pos" in name:
            p.data.normal_(0, 0.5)
    assert any("rel_pos" in name for name, _ in ref.named_parameters())
    fast = copy.deepcopy(ref)
    assert enable_sdpa(fast) >= len(ref.image_encoder.blocks) + 1
    x = torch.randn(2, 3, ref.image_encoder.img_size, ref.image_encoder.img_size)
    with torch.no_grad():
        fa, fb = ref.image_encoder(x), fast.image_encoder(x)
        torch.testing.assert_close(fb, fa, atol=1e-4, rtol=1e-4)
        pts = (torch.rand(5, 1, 2) * ref.image_encoder.img_size, torch.ones(5, 1, dtype=torch.int))
        sparse, dense = ref.prompt_encoder(points=pts, boxes=None, masks=None)
        pe = ref.prompt_encoder.get_dense_pe()
        ma, ia = ref.mask_decoder(fa[:1], pe, sparse, dense, multimask_output=True)
        mb, ib = fast.mask_decoder(fa[:1], pe, sparse, dense, multimask_output=True)
    torch.testing.assert_close(mb, ma, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ib, ia, atol=1e-4, rtol=1e-4)
    assert all("forward" not in vars(m) for m in ref.modules())  # the reference instance is untouched


def test_the_cached_relative_position_table_is_segment_anythings():
    from segment_anything.modeling.image_encoder import get_rel_pos

    from ssam.model.sdpa import rel_pos_table

    torch.manual_seed(0)
    for q, k in ((14, 14), (64, 64), (5, 9), (9, 5)):
        table = torch.randn(2 * max(q, k) - 1, 8)
        assert torch.equal(rel_pos_table(q, k, table), get_rel_pos(q, k, table))
        assert torch.equal(rel_pos_table(q, k, table * 2), get_rel_pos(q, k, table * 2))  # cached index
    short = torch.randn(7, 8)  # interpolated: segment-anything's own path
    assert torch.equal(rel_pos_table(14, 14, short), get_rel_pos(14, 14, short))
