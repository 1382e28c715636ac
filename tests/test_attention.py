"""Chunked attention equals its masked reference; chunk >= T equals full causal attention; any length works."""

import pytest
import torch
import torch.nn.functional as F

from densa.model.cache import MegaLayerCache, Positions
from densa.model.mega import (
    _fused_width,
    chunked_attention,
    chunked_attention_reference,
    positional_attention,
    ring_attention,
)


@pytest.mark.parametrize("length", [1, 5, 16, 17, 48, 61])
@pytest.mark.parametrize("chunk", [4, 16])
def test_chunked_matches_reference(length, chunk):
    q, k = torch.randn(2, 3, length, 8), torch.randn(2, 3, length, 8)
    v = torch.randn(2, 3, length, 12)  # value width differs from q/k width, as in Mega
    out = chunked_attention(q, k, v, chunk, scale=0.3)
    torch.testing.assert_close(out, chunked_attention_reference(q, k, v, chunk, 0.3), atol=1e-5, rtol=1e-5)


def test_inference_widening_to_the_fused_kernel_changes_nothing():
    """In inference q/k are zero-padded to v's width (SDPA's fused CPU kernel); with autograd they are not. Both
    agree with each other and with the reference, and gradients still flow on the plain path."""
    q, k, v = torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 32)
    assert _fused_width(q, k, v) == 24
    fused = chunked_attention(q, k, v, 16, scale=0.4)
    q.requires_grad_()
    assert _fused_width(q, k, v) == 0
    plain = chunked_attention(q, k, v, 16, scale=0.4)
    torch.testing.assert_close(fused, plain.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, chunked_attention_reference(q.detach(), k, v, 16, 0.4), atol=1e-5, rtol=1e-5)
    plain.sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    with torch.no_grad():
        assert _fused_width(q, k, v) == 24


def test_chunk_at_least_length_is_full_causal_attention():
    q, k, v = torch.randn(1, 2, 37, 8), torch.randn(1, 2, 37, 8), torch.randn(1, 2, 37, 8)
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    for chunk in (37, 64, 4096):
        torch.testing.assert_close(chunked_attention(q, k, v, chunk, scale=8**-0.5), full, atol=1e-5, rtol=1e-5)


def test_queries_after_a_cached_chunk_head():
    """With p cached keys of the open chunk, the last T queries see what they would in the full sequence."""
    q, k, v = torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    full = chunked_attention_reference(q, k, v, 8, 0.5)
    for start in (3, 8, 13, 29):  # the cache holds keys from the chunk start (16 or 8 or 0) up to `start`
        chunk_start = start // 8 * 8
        out = chunked_attention(q[:, :, start:], k[:, :, chunk_start:], v[:, :, chunk_start:], 8, 0.5)
        torch.testing.assert_close(out, full[:, :, start:], atol=1e-5, rtol=1e-5)


def test_ring_attention_equals_positional_attention_over_a_written_ring():
    """A decoding step's one-comparison mask (key at or after the query's chunk start) is the general positional
    mask, for rows at different positions: in their first chunk, at a chunk's first token (the ring still holds
    the previous chunk's keys), mid-chunk, and at a chunk's last slot."""
    torch.manual_seed(0)
    c, B, H = 8, 4, 2
    ring = MegaLayerCache(slots=c)
    ring.allocate(B, H, (4, 6), torch.zeros(1), torch.zeros(B, 1, 1))
    ends = torch.tensor([3, 8, 13, 15])  # each row's decoding position
    for p in range(int(ends.max()) + 1):
        ids_B = torch.minimum(torch.full((B,), p), ends)  # rows that reached their end rewrite it (same keys)
        pos = Positions(ids_B[:, None], None, ids_B, 1)
        ring.step(torch.randn(B, H, 1, 4), torch.randn(B, H, 1, 6), pos)
    q = torch.randn(B, H, 1, 4)
    pos = Positions(ends[:, None], None, ends, 1)
    out = ring_attention(q, ring.k, ring.v, ring.k_pos, pos.chunk_start(c), 0.5)
    ref = positional_attention(q, ring.k, ring.v, ends[:, None], ring.k_pos, c, 0.5)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    assert pos.chunk_start(c).tolist() == [0, 8, 8, 8]
