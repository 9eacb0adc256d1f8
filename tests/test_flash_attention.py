"""ember.attention.flash_attention against PyTorch's scaled_dot_product_attention (SDPA).

Tolerances. float64: 1e-12, since the tiled online softmax is the same sum as SDPA's taken in
another order, and float64 rounding (eps 2.2e-16) over sums of ~100 O(1) terms stays far below
it; a wrong rescaling or a missing tile would be off by O(1e-2) or more. float32: 1e-5, the
issue's bound: eps is 1.2e-7 and the tiles reorder sums of up to ~100 products of O(1) values, so
differences of a few 1e-7..1e-6 are rounding, and 1e-5 still catches any algorithmic error.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ember.attention import flash_attention
from ember.errors import EmberError

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def inputs(t_q: int, t_k: int, dtype: torch.dtype, heads: int = 3, kv_heads: int | None = None, dim: int = 16,
           batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    kv_heads = kv_heads or heads
    q = torch.randn(batch, heads, t_q, dim, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(batch, kv_heads, t_k, dim, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(batch, kv_heads, t_k, dim, generator=g, dtype=dtype).requires_grad_()
    return q, k, v


def padding_mask(batch: int, t_k: int) -> torch.Tensor:
    """[batch, 1, 1, T_k], True = a real token: the second sequence has its last 7 keys padded."""
    mask = torch.ones(batch, 1, 1, t_k, dtype=torch.bool)
    mask[-1, ..., -7:] = False
    return mask


def reference(q, k, v, causal, mask):
    """SDPA; a causal mask with padding is spelled as one boolean mask (SDPA takes one or the other)."""
    if causal and mask is not None:
        mask = mask & torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          enable_gqa=q.shape[1] != k.shape[1])


def assert_matches(q, k, v, *, causal, mask, block_q, block_k, tol):
    out = flash_attention(q, k, v, causal=causal, attn_mask=mask, block_q=block_q, block_k=block_k)
    ref = reference(q, k, v, causal, mask)
    torch.testing.assert_close(out, ref, atol=tol, rtol=0)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    theirs = torch.autograd.grad(ref, (q, k, v), grad)
    for name, a, b in zip("qkv", ours, theirs):
        torch.testing.assert_close(a, b, atol=tol, rtol=0, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("t_q,t_k", [(70, 70), (33, 90), (90, 33)])
def test_equals_sdpa_output_and_gradients(dtype, causal, padded, t_q, t_k):
    # Blocks of 16 x 24 divide none of the lengths: the last tile of each side is partial.
    q, k, v = inputs(t_q, t_k, dtype)
    mask = padding_mask(q.shape[0], t_k) if padded else None
    assert_matches(q, k, v, causal=causal, mask=mask, block_q=16, block_k=24, tol=TOL[dtype])


@pytest.mark.parametrize("block_q,block_k", [(1, 1), (7, 5), (64, 64), (128, 128)])
def test_any_block_size_gives_the_same_attention(block_q, block_k):
    q, k, v = inputs(45, 45, torch.float64)
    assert_matches(q, k, v, causal=True, mask=None, block_q=block_q, block_k=block_k, tol=TOL[torch.float64])


def test_additive_float_mask_and_grouped_query_heads():
    q, k, v = inputs(40, 52, torch.float64, heads=4, kv_heads=2)
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(1, 4, 40, 52, generator=g, dtype=torch.float64)  # e.g. ALiBi-like additive scores
    assert_matches(q, k, v, causal=False, mask=bias, block_q=16, block_k=16, tol=TOL[torch.float64])


def test_a_query_that_may_attend_to_nothing_gets_zeros_like_sdpa():
    q, k, v = inputs(20, 20, torch.float64, batch=1)
    mask = torch.ones(1, 1, 20, 20, dtype=torch.bool)
    mask[..., 5, :] = False  # query 5 sees no key
    out = flash_attention(q, k, v, attn_mask=mask, block_q=8, block_k=8)
    assert torch.all(out[..., 5, :] == 0)
    assert_matches(q, k, v, causal=False, mask=mask, block_q=8, block_k=8, tol=TOL[torch.float64])


def test_gradcheck_of_its_own_backward():
    """Finite differences against the custom backward, independent of SDPA."""
    q, k, v = inputs(9, 11, torch.float64, heads=2, dim=4, batch=1)
    mask = padding_mask(1, 11)
    assert torch.autograd.gradcheck(
        lambda q, k, v: flash_attention(q, k, v, causal=True, attn_mask=mask, block_q=4, block_k=3), (q, k, v))


class LargestTensor(TorchDispatchMode):
    """Records the largest memory block (storage, in bytes) any operation's output lives in, over
    every op of forward and backward. A view (expand, slice) shares its base's storage, so it
    counts as what it really occupies, not as its shape."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > self.largest:
                self.largest, self.op = t.untyped_storage().nbytes(), func
        return result


def test_forward_and_backward_never_make_a_time_by_time_tensor():
    batch, heads, t, dim, block = 1, 2, 512, 16, 64
    q, k, v = inputs(t, t, torch.float32, heads=heads, dim=dim, batch=batch)
    mask = padding_mask(batch, t)
    with LargestTensor() as flash:
        out = flash_attention(q, k, v, causal=True, attn_mask=mask, block_q=block, block_k=block)
        out.sum().backward()
    # The biggest things it may make: a q/k/v-sized tensor (O, dQ, ...) or one tile of scores.
    assert flash.largest <= 4 * max(batch * heads * t * dim, batch * heads * block * block), flash.op
    # The same probe sees naive attention's scores: batch x heads x T x T.
    with LargestTensor() as naive:
        scores = (q @ k.transpose(-1, -2)) / dim ** 0.5
        (torch.softmax(scores, dim=-1) @ v).sum().backward()
    assert naive.largest >= 4 * batch * heads * t * t


def test_bad_shapes_are_one_clear_sentence():
    q, k, v = inputs(8, 8, torch.float32, heads=3)
    with pytest.raises(EmberError, match="divide"):
        flash_attention(q, k[:, :2], v[:, :2])
    with pytest.raises(EmberError, match="broadcast"):
        flash_attention(q, k, v, attn_mask=torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(EmberError, match=r"\[batch, heads, time, head_dim\]"):
        flash_attention(q[0], k[0], v[0])
