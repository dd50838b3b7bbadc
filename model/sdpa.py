"""Scaled-dot-product attention for SAM's attention blocks (the masks engine's, on every device).

segment-anything's attention layers form the full softmax(QK^T)V by hand. PyTorch's
``F.scaled_dot_product_attention`` computes the same thing with fused kernels (flash or
memory-efficient attention on CUDA, a flash kernel on a CPU), without materialising the attention
matrix where it can: on a CPU the encoder's global blocks then no longer write and reread
``heads x 4096 x 4096`` floats for each step of the attention (vit_b's encoder x1.3 in float32,
x1.1 in bf16; ``benchmarks/README.md``).
:func:`enable_sdpa` rebinds the ``forward`` of each attention module of one model instance (other
instances, e.g. a reference model, keep segment-anything's own forward). Written here because
segment-anything has no switch for it; the image encoder's decomposed relative-position term
becomes SDPA's additive ``attn_mask``.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention as EncoderAttention
from segment_anything.modeling.image_encoder import get_rel_pos
from segment_anything.modeling.transformer import Attention as DecoderAttention

_REL_INDEX: dict[tuple[int, int, torch.device], torch.Tensor] = {}


def rel_pos_table(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """segment-anything's ``get_rel_pos`` with its index built once per size and device.

    Its own builds the ``q x k`` index on the CPU on every call and indexes the device's table
    with it: a host-to-device copy that waits for the device, twice per attention block (128 per
    vit_h forward). When no interpolation is needed the same gather runs with a cached device index.
    """
    if rel_pos.shape[0] != 2 * max(q_size, k_size) - 1:
        return get_rel_pos(q_size, k_size, rel_pos)  # interpolated: segment-anything's own path
    key = (q_size, k_size, rel_pos.device)
    if key not in _REL_INDEX:
        q = torch.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
        k = torch.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
        _REL_INDEX[key] = ((q - k) + (k_size - 1) * max(q_size / k_size, 1.0)).long().to(rel_pos.device)
    return rel_pos[_REL_INDEX[key]]


def rel_pos_terms(
    q_bnlc: torch.Tensor, attn: EncoderAttention, h: int, w: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two halves of SAM's decomposed relative-position term: each query's score for each key
    row ``[B*heads, h, w, h]`` and for each key column ``[B*heads, h, w, w]``.

    Args:
        q_bnlc: queries ``[B*heads, h*w, C]`` (unscaled, as segment-anything uses them).
    """
    rh, rw = rel_pos_table(h, h, attn.rel_pos_h), rel_pos_table(w, w, attn.rel_pos_w)
    r_q = q_bnlc.reshape(-1, h, w, q_bnlc.shape[-1])
    return torch.einsum("bhwc,hkc->bhwk", r_q, rh), torch.einsum("bhwc,wkc->bhwk", r_q, rw)


def rel_pos_bias(q_bnlc: torch.Tensor, attn: EncoderAttention, h: int, w: int) -> torch.Tensor:
    """The decomposed relative-position term of SAM's encoder as a ``[B*heads, h*w, h*w]`` bias
    (``q_bnlc`` as in :func:`rel_pos_terms`)."""
    rel_h, rel_w = rel_pos_terms(q_bnlc, attn, h, w)
    return (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(-1, h * w, h * w)


def encoder_attention_forward(self: EncoderAttention, x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, H, W, C]`` -> ``[B, H, W, C]``, as segment-anything's, through SDPA."""
    b, h, w, _ = x.shape
    qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, heads, h*w, head_dim)
    mask = None
    if self.use_rel_pos:
        flat_q = q.reshape(b * self.num_heads, h * w, -1)
        mask = rel_pos_bias(flat_q, self, h, w).view(b, self.num_heads, h * w, h * w).to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
    return self.proj(out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1))


def decoder_attention_forward(self: DecoderAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """The two-way transformer's attention, ``[B, N, C]`` tokens, through SDPA."""
    q = self._separate_heads(self.q_proj(q), self.num_heads)
    k = self._separate_heads(self.k_proj(k), self.num_heads)
    v = self._separate_heads(self.v_proj(v), self.num_heads)
    return self.out_proj(self._recombine_heads(F.scaled_dot_product_attention(q, k, v)))


def enable_sdpa(model: torch.nn.Module) -> int:
    """Route every SAM attention block of ``model`` through SDPA; returns how many were switched."""
    n = 0
    for module in model.modules():
        if isinstance(module, EncoderAttention):
            module.forward = types.MethodType(encoder_attention_forward, module)
            n += 1
        elif isinstance(module, DecoderAttention):
            module.forward = types.MethodType(decoder_attention_forward, module)
            n += 1
    return n
