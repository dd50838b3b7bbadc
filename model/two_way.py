"""SAM's mask decoder over many prompts of one image, for inference: the two-way transformer's
first block's image side done once instead of once per prompt, the projections of the image
tokens folded into the prompts' few tokens, and the upscaling as matrix products.

segment-anything runs the mask decoder's transformer on ``P x HW x C`` image tokens, one copy of
the image embedding per prompt (``MaskDecoder.predict_masks`` ``repeat_interleave``s it). Two
regroupings of the same arithmetic make that cheaper:

* In automatic mode every prompt of a decoder call usually belongs to one image, and until the
  first block's image-to-token attention writes into them those ``P`` copies are identical: the
  image tokens plus the no-mask embedding. So the first block's image-side work (adding the
  positional encoding, the token-to-image keys and values) is the same for every prompt:
  :func:`block_forward` computes it once on ``1 x HW x C`` and broadcasts, so the per-prompt
  image tokens first exist after that attention.
* Each attention between a prompt's ~7 tokens and its 4096 image tokens projects the image tokens
  (``HW x C`` by ``C x C'``, ``C'`` = 128) for keys and values, or for queries and the output.
  Folded into the tokens' side instead (:func:`attend_image_keys`, :func:`attend_image_queries`:
  a head's ``q . (W_k x + b_k)`` is ``(W_k^T q) . x`` plus a term the softmax ignores), the image
  tokens meet ``C x heads*N`` matmuls (``heads*N`` = 56) and no ``P x HW x C'`` tensor is written:
  about 2.3 times fewer multiply-adds per prompt in the transformer.

After the transformer, the decoder upscales each prompt's image tokens 4x (two stride-2 2x2
transposed convolutions, a channel LayerNorm and GELUs between) and takes the product of each mask
token's hypernetwork vector with the upscaled channels. A 2x2 stride-2 transposed convolution
writes every input pixel's 2x2 block from that pixel alone, so each one is a matrix product of the
pixels' channels with the weight laid out as ``C_in x (2*2*C_out)``: :func:`upscaled_mask_logits`
runs both as matrix products in a channels-last layout (the LayerNorm then normalises the last
dimension) and moves the sub-pixels to their places once, at the end, on the few mask channels
rather than on the 32 or 64 upscaled ones.

The results are segment-anything's to rounding (``tests/model/test_amg.py`` checks the functions
against its ``Attention`` and its upscaling in float64 and the decoder against its forward).
Training keeps segment-anything's own forward (see :func:`two_way_forward`).

Written here because segment-anything's ``TwoWayTransformer`` and ``MaskDecoder`` have no such
paths; their modules and weights are used as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock, TwoWayTransformer
from torch import nn


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``B x N x C`` -> ``B x heads x N x C/heads``."""
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """``B x heads x N x d`` -> ``B x N x heads*d``."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def attend_shared_keys(attn: Attention, q_pnc: torch.Tensor, k_1mc: torch.Tensor, v_1mc: torch.Tensor):
    """``attn(q, k, v)`` for P query sets against one shared key/value set: the keys and values are
    projected once and every prompt's queries go through one attention call as one long set."""
    p, n, _ = q_pnc.shape
    q = _heads(attn.q_proj(q_pnc).reshape(1, p * n, -1), attn.num_heads)
    k, v = _heads(attn.k_proj(k_1mc), attn.num_heads), _heads(attn.v_proj(v_1mc), attn.num_heads)
    out = _merge(F.scaled_dot_product_attention(q, k, v))  # 1 x P*N x C'
    return attn.out_proj(out.reshape(p, n, -1))


def _values_through_out_proj(attn: Attention, v_pnc: torch.Tensor) -> torch.Tensor:
    """Each head's values of P prompts' few tokens taken through that head's slice of the output
    projection: ``P x heads*N x C``. The attention's output is then one matmul of its weights
    with these plus the output bias, instead of a ``P x M x C'`` output projected row by row."""
    h = attn.num_heads
    v = _heads(attn.v_proj(v_pnc), h)  # P x h x N x d
    c_out, d = attn.out_proj.out_features, v.shape[-1]
    vo = torch.einsum("phnd,chd->phnc", v, attn.out_proj.weight.view(c_out, h, d))
    return vo.reshape(v.shape[0], h * v.shape[2], c_out)


def attend_image_queries(attn: Attention, q_pmc: torch.Tensor, k_pnc: torch.Tensor, v_pnc: torch.Tensor):
    """``attn(q, k, v)`` for P prompts' own image tokens (``q``, ``P x M x C``) against their few
    tokens, without projecting the image tokens: each head's query projection is folded into
    that prompt's keys (``q_h . k = x . (W_q,h^T k) + b_q,h . k``), and the output projection into
    the values, so per prompt the image tokens meet two ``M x C`` by ``C x heads*N`` matmuls
    instead of two ``M x C`` by ``C x C'`` projections (``heads*N`` = 56 against ``C'`` = 128 in
    SAM's decoder, and no ``P x M x C'`` tensors written). The same arithmetic regrouped."""
    h = attn.num_heads
    k = _heads(attn.k_proj(k_pnc), h)  # P x h x N x d
    p, _, n, d = k.shape
    c_in = attn.q_proj.in_features
    k = k * d**-0.5  # the scale on the small side
    kq = torch.einsum("phnd,hdc->phnc", k, attn.q_proj.weight.view(h, d, c_in)).reshape(p, h * n, c_in)
    bias = torch.einsum("phnd,hd->phn", k, attn.q_proj.bias.view(h, d)).reshape(p, 1, h * n)
    # The scores are laid out P x h*N x M: the softmax over each head's N keys then runs along a
    # dimension with the M image tokens innermost, which a CPU's kernel vectorises (over N = 7
    # innermost it was 20 times slower, ~8% of the vit_b masks stage)
    if q_pmc.shape[0] == 1 and p > 1:  # shared image tokens: one GEMM for all prompts, no copies
        m = q_pmc.shape[1]
        scores = torch.addmm(bias.reshape(p * h * n, 1), kq.reshape(p * h * n, c_in), q_pmc[0].T)
        scores = scores.view(p, h * n, m)
    else:
        scores = torch.baddbmm(bias.transpose(1, 2), kq, q_pmc.transpose(1, 2))  # P x h*N x M
        m = scores.shape[2]
    weights = torch.softmax(scores.view(p, h, n, m), dim=2).view(p, h * n, m)
    return weights.transpose(1, 2) @ _values_through_out_proj(attn, v_pnc) + attn.out_proj.bias


def attend_image_keys(attn: Attention, q_pnc: torch.Tensor, k_pmc: torch.Tensor, v_pmc: torch.Tensor):
    """``attn(q, k, v)`` for P prompts' few tokens against their own image tokens (``k``, ``v``:
    ``P x M x C``), without projecting the image tokens: each head's key projection is folded
    into the queries (the key bias only shifts every score of a query alike, which the softmax
    ignores) and the value projection applied after the weighted sum (the weights of a query
    sum to one, so the value bias passes through unchanged). Per prompt the image tokens meet
    two ``heads*N x C`` by ``C x M`` matmuls instead of two ``M x C`` by ``C x C'`` projections.
    The same arithmetic regrouped."""
    h = attn.num_heads
    q = _heads(attn.q_proj(q_pnc), h)  # P x h x N x d
    p, _, n, d = q.shape
    c_in = attn.k_proj.in_features
    qk = torch.einsum("phnd,hdc->phnc", q * d**-0.5, attn.k_proj.weight.view(h, d, c_in))
    weights = torch.softmax(qk.reshape(p, h * n, c_in) @ k_pmc.transpose(1, 2), dim=-1)  # P x h*N x M
    mixed = (weights @ v_pmc).view(p, h, n, c_in)  # each head's weighted image tokens
    out = torch.einsum("phnc,hdc->pnhd", mixed, attn.v_proj.weight.view(h, d, c_in))
    return attn.out_proj(out.reshape(p, n, h * d) + attn.v_proj.bias)


def block_forward(block: TwoWayAttentionBlock, queries, keys, query_pe, key_pe_1mc):
    """``TwoWayAttentionBlock.forward`` for inference over P prompts; returns the queries and the
    per-prompt image tokens (``P x HW x C``).

    ``keys``: the image tokens, ``1 x HW x C`` when every prompt has the same ones (the first
    block: its token-to-image keys and values are then projected once, :func:`attend_shared_keys`)
    or ``P x HW x C`` (:func:`attend_image_keys`); the image-to-token attention is
    :func:`attend_image_queries` either way."""
    if block.skip_first_layer_pe:
        queries = block.self_attn(q=queries, k=queries, v=queries)
    else:
        q = queries + query_pe
        queries = queries + block.self_attn(q=q, k=q, v=queries)
    queries = block.norm1(queries)
    k = keys + key_pe_1mc  # once (per prompt only when the image tokens are); unchanged until its second use
    shared = keys.shape[0] == 1 and queries.shape[0] > 1
    attend = attend_shared_keys if shared else attend_image_keys
    queries = block.norm2(queries + attend(block.cross_attn_token_to_image, queries + query_pe, k, keys))
    queries = block.norm3(queries + block.mlp(queries))
    attn_out = attend_image_queries(block.cross_attn_image_to_token, k, queries + query_pe, queries)
    return queries, block.norm4(keys + attn_out)


def two_way_forward(
    transformer: TwoWayTransformer, src: torch.Tensor, pe: torch.Tensor, tokens: torch.Tensor
):
    """``transformer(src, pe, tokens)`` for P prompts, as ``TwoWayTransformer.forward``.

    The regrouped path (module docstring) runs for inference (no gradient: the engine's decoder
    calls, thousands of prompts per image), its first block shared when every prompt has the same
    image tokens. Training keeps segment-anything's own forward on ``P`` copies: it decodes a
    few dozen prompts per step, where sharing saves little, and the smoke model's training is
    chaotic enough that a change in the last bits of the decoder's arithmetic moves its held-out
    figures (docs/TRAINING.md), so its arithmetic stays the one the documented runs used.

    Args:
        src: ``1 x C x h x w`` (the same image tokens for every prompt: shared when inferring) or
            ``P x C x h x w`` (each prompt's own; segment-anything's forward for any other
            transformer module).
        pe: ``1 x C x h x w`` positional encoding.
        tokens: ``P x N x C`` prompt and output tokens.

    Returns:
        The processed tokens ``P x N x C`` and image tokens ``P x HW x C``.
    """
    p = tokens.shape[0]
    if not isinstance(transformer, TwoWayTransformer) or torch.is_grad_enabled():
        src = src if src.shape[0] == p else src.expand(p, -1, -1, -1).contiguous()
        return transformer(src, pe.expand(p, -1, -1, -1), tokens)
    # contiguous: sums with these follow their layout, and a transposed one makes LayerNorm copy
    keys = src.flatten(2).transpose(1, 2).contiguous()  # 1 or P x HW x C
    key_pe = pe.flatten(2).transpose(1, 2).contiguous()
    queries = tokens
    for layer in transformer.layers:  # the first block's output is per prompt
        queries, keys = block_forward(layer, queries, keys, tokens, key_pe)
    final = transformer.final_attn_token_to_image
    attn_out = attend_image_keys(final, queries + tokens, keys + key_pe, keys)
    return transformer.norm_final_attn(queries + attn_out), keys


def image_tokens(features: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """The decoder's image tokens ``features + dense``, kept at one row when inferring and every
    prompt has the same ones (one image embedding, and a dense embedding of one row or a broadcast
    of one, as the prompt encoder's no-mask embedding is) so that :func:`two_way_forward` can share
    them. With gradients it is segment-anything's sum over the prompts' rows (also its gradient's
    summation order: the no-mask embedding is trained)."""
    one = features.shape[0] == 1 and (dense.shape[0] == 1 or dense.stride(0) == 0)
    if one and not torch.is_grad_enabled():
        return features + dense[:1]
    return (features.expand(dense.shape[0], -1, -1, -1) if features.shape[0] == 1 else features) + dense


def _as_matrices(upscaling: nn.Module) -> bool:
    """Whether ``upscaling`` is segment-anything's decoder upscaling (2x2 stride-2 transposed
    convolution, ``LayerNorm2d``, an elementwise activation, the same convolution, an activation),
    which :func:`upscaled_mask_logits` can run as matrix products."""
    if not isinstance(upscaling, nn.Sequential) or len(upscaling) != 5:
        return False
    t1, norm, a1, t2, a2 = upscaling
    convs = all(
        isinstance(t, nn.ConvTranspose2d)
        and t.kernel_size == (2, 2)
        and t.stride == (2, 2)
        and t.padding == (0, 0)
        and t.output_padding == (0, 0)
        and t.dilation == (1, 1)
        and t.groups == 1
        and t.bias is not None
        for t in (t1, t2)
    )
    elementwise = all(type(a) in (nn.GELU, nn.ReLU, nn.SiLU) for a in (a1, a2))
    return convs and elementwise and isinstance(norm, LayerNorm2d)


def _pixels_by_subpixels(conv: nn.ConvTranspose2d) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2x2 stride-2 transposed convolution as ``C_in x (i, j, C_out)`` weights and their bias."""
    c_in = conv.in_channels
    return conv.weight.permute(0, 2, 3, 1).reshape(c_in, -1), conv.bias.repeat(4)


def convolution_mask_logits(
    upscaling: nn.Module, hyper_pkc: torch.Tensor, src_pmc: torch.Tensor, hw: tuple[int, int]
) -> torch.Tensor:
    """:func:`upscaled_mask_logits` as ``MaskDecoder.predict_masks`` computes them: the upscaling
    module itself on ``P x C x h x w``, then the hypernetwork product."""
    p, c = src_pmc.shape[0], src_pmc.shape[2]
    up = upscaling(src_pmc.transpose(1, 2).view(p, c, *hw))
    return (hyper_pkc @ up.flatten(2)).view(p, -1, *up.shape[-2:])


def upscaled_mask_logits(
    upscaling: nn.Module, hyper_pkc: torch.Tensor, src_pmc: torch.Tensor, hw: tuple[int, int]
) -> torch.Tensor:
    """The mask decoder's low-res mask logits ``P x K x 4h x 4w``: each prompt's ``K`` hypernetwork
    vectors (``hyper_pkc``) times its upscaled image tokens (``src_pmc``: ``P x h*w x C``, ``hw``
    the image embedding's size), as ``MaskDecoder.predict_masks`` computes them.

    For inference the upscaling runs as two matrix products (module docstring): on a CPU, for
    SAM's decoder (C = 256), 1.3 times faster in float32 and 1.7 times in bf16 than the
    convolutions. With gradients, or for another upscaling module, segment-anything's own."""
    if torch.is_grad_enabled() or not _as_matrices(upscaling):
        return convolution_mask_logits(upscaling, hyper_pkc, src_pmc, hw)
    p, c = src_pmc.shape[0], src_pmc.shape[2]
    h, w = hw
    t1, norm, act1, t2, act2 = upscaling
    w1, b1 = _pixels_by_subpixels(t1)
    w2, b2 = _pixels_by_subpixels(t2)
    c1, c2 = t1.out_channels, t2.out_channels
    x = torch.addmm(b1, src_pmc.reshape(-1, c), w1).view(-1, c1)  # rows (p, y, x, i1, j1)
    x = act1(F.layer_norm(x, (c1,), norm.weight, norm.bias, norm.eps))  # LayerNorm2d's arithmetic
    x = act2(torch.addmm(b2, x, w2)).view(p, -1, c2)  # rows (y, x, i1, j1, i2, j2) of each prompt
    m = torch.bmm(hyper_pkc, x.transpose(1, 2))  # P x K x (y, x, i1, j1, i2, j2)
    k = m.shape[1]
    # mask row 4y + 2*i1 + i2, column 4x + 2*j1 + j2
    return m.view(p, k, h, w, 2, 2, 2, 2).permute(0, 1, 2, 4, 6, 3, 5, 7).reshape(p, k, 4 * h, 4 * w)
