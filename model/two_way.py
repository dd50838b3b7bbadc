"""SAM's two-way transformer over many prompts of one image, the image side of its first block
done once instead of once per prompt.

segment-anything runs the mask decoder's transformer on ``P x HW x C`` image tokens, one copy of
the image embedding per prompt (``MaskDecoder.predict_masks`` ``repeat_interleave``s it). In
automatic mode every prompt of a decoder call usually belongs to one image, and until the first
block's image-to-token attention writes into them those ``P`` copies are identical: the image
tokens plus the no-mask embedding. So the first block's image-side work (adding the positional
encoding, the token-to-image keys and values, the image-to-token queries) is the same for every
prompt. :func:`two_way_forward` computes it once on ``1 x HW x C`` and broadcasts, so the
per-prompt image tokens first exist after that attention (for inference; training keeps
segment-anything's forward). The result is the same computation in another grouping (checked
against segment-anything's forward in ``tests/model/test_amg.py``).

Written here because segment-anything's ``TwoWayTransformer`` has no such path; its modules and
weights are used as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock, TwoWayTransformer


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


def attend_shared_queries(attn: Attention, q_1mc: torch.Tensor, k_pnc: torch.Tensor, v_pnc: torch.Tensor):
    """``attn(q, k, v)`` for one shared query set (the image tokens) against P prompts' few tokens:
    the queries are projected once. With a handful of keys per prompt the attention is two matmuls
    and a softmax: the scores of every prompt's keys in one matmul per head (the shared queries are
    not copied per prompt), then a softmax over each prompt's own keys."""
    h = attn.num_heads
    q = _heads(attn.q_proj(q_1mc), h)[0]  # h x M x d
    k, v = _heads(attn.k_proj(k_pnc), h), _heads(attn.v_proj(v_pnc), h)  # P x h x N x d
    p, _, n, d = k.shape
    m = q.shape[1]
    scores = q @ k.permute(1, 3, 0, 2).reshape(h, d, p * n)  # h x M x P*N
    weights = torch.softmax(scores.view(h, m, p, n) * d**-0.5, dim=-1)
    out = torch.einsum("hmpn,phnd->pmhd", weights, v)  # P x M x h x d: the heads already merged
    return attn.out_proj(out.reshape(p, m, h * d))


def first_block_shared(block: TwoWayAttentionBlock, queries, keys_1mc, query_pe, key_pe_1mc):
    """``TwoWayAttentionBlock.forward`` with image tokens shared by all prompts (``1 x HW x C``);
    returns the queries and the per-prompt image tokens (``P x HW x C``)."""
    if block.skip_first_layer_pe:
        queries = block.self_attn(q=queries, k=queries, v=queries)
    else:
        q = queries + query_pe
        queries = queries + block.self_attn(q=q, k=q, v=queries)
    queries = block.norm1(queries)
    k = keys_1mc + key_pe_1mc  # once, not once per prompt
    attn_out = attend_shared_keys(block.cross_attn_token_to_image, queries + query_pe, k, keys_1mc)
    queries = block.norm2(queries + attn_out)
    queries = block.norm3(queries + block.mlp(queries))
    attn_out = attend_shared_queries(block.cross_attn_image_to_token, k, queries + query_pe, queries)
    return queries, block.norm4(keys_1mc + attn_out)


def two_way_forward(
    transformer: TwoWayTransformer, src: torch.Tensor, pe: torch.Tensor, tokens: torch.Tensor
):
    """``transformer(src, pe, tokens)`` for P prompts, as ``TwoWayTransformer.forward``.

    The shared path runs for inference (no gradient: the engine's decoder calls, thousands of
    prompts per image). Training keeps segment-anything's own forward on ``P`` copies: it decodes a
    few dozen prompts per image, where sharing saves little, and the smoke model's training is
    chaotic enough that a change in the last bits of the decoder's arithmetic moves its held-out
    figures (docs/TRAINING.md), so its arithmetic stays the one the documented runs used.

    Args:
        src: ``1 x C x h x w`` (the same image tokens for every prompt: shared when inferring) or
            ``P x C x h x w`` (segment-anything's own forward, as for any other transformer module).
        pe: ``1 x C x h x w`` positional encoding.
        tokens: ``P x N x C`` prompt and output tokens.

    Returns:
        The processed tokens ``P x N x C`` and image tokens ``P x HW x C``.
    """
    p = tokens.shape[0]
    shared = src.shape[0] == 1 and p > 1 and isinstance(transformer, TwoWayTransformer)
    if not shared or torch.is_grad_enabled():
        src = src if src.shape[0] == p else src.expand(p, -1, -1, -1).contiguous()
        return transformer(src, pe.expand(p, -1, -1, -1), tokens)
    keys = src.flatten(2).transpose(1, 2)  # 1 x HW x C
    key_pe = pe.flatten(2).transpose(1, 2)
    queries = tokens
    for i, layer in enumerate(transformer.layers):
        if i == 0:
            queries, keys = first_block_shared(layer, queries, keys, tokens, key_pe)
        else:
            queries, keys = layer(queries=queries, keys=keys, query_pe=tokens, key_pe=key_pe)
    attn_out = transformer.final_attn_token_to_image(q=queries + tokens, k=keys + key_pe, v=keys)
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
