"""FlashAttention you can read: exact attention in tiles, forward and backward, in plain PyTorch.

Attention is O = softmax(S) V with S = scale * Q K^T (+ a mask). Written that way it builds the
T_q x T_k matrices S and P = softmax(S), and keeps P for the backward: memory quadratic in the
sequence. FlashAttention (Dao et al. 2022; FlashAttention-2, Dao 2023) computes the same O
without ever holding S or P whole:

Forward (FlashAttention-2, Algorithm 1). For a block of queries Q_i, walk the key/value blocks
K_j, V_j keeping per query row a running maximum m, a running sum l and an unnormalised output:

    S_ij    = scale * Q_i K_j^T                       (one block_q x block_k tile)
    m_new   = max(m, rowmax(S_ij))
    P~_ij   = exp(S_ij - m_new)
    l       = exp(m - m_new) * l + rowsum(P~_ij)
    O~_i    = diag(exp(m - m_new)) O~_i + P~_ij V_j
    m       = m_new

and at the end O_i = diag(l)^-1 O~_i and the log-sum-exp L_i = m + log(l), the only per-row
statistic the backward needs. Subtracting the running maximum is the usual softmax
stabilisation, applied online: rescaling by exp(m - m_new) corrects what was summed under the old
maximum, so the result equals softmax(S) V exactly (up to floating-point rounding).

Backward (FlashAttention-2, Algorithm 2). With D = rowsum(dO o O) and the saved L, each tile's
probabilities are recomputed instead of read back, P_ij = exp(S_ij - L_i), and

    dV_j += P_ij^T dO_i
    dP_ij = dO_i V_j^T
    dS_ij = P_ij o (dP_ij - D_i)
    dQ_i += scale * dS_ij K_j
    dK_j += scale * dS_ij^T Q_i

(D_i = rowsum(P_ij o dP_ij) summed over all j, which is rowsum(dO_i o O_i): the softmax Jacobian
without the matrix.) Memory is O(T * head_dim) plus one tile, whatever T is; the price is
computing S twice and, here, a Python loop over tiles that a fused GPU kernel does not pay.

Conventions follow `torch.nn.functional.scaled_dot_product_attention` (SDPA), which the tests
compare against: a boolean `attn_mask` is True where a query may attend, a float one is added to
the scores; `causal=True` lets query i see keys 0..i (SDPA's top-left alignment when T_q != T_k);
a query row that may attend to nothing gets a zero output and zero gradients, as SDPA gives.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ember.errors import EmberError


def flash_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, attn_mask: Tensor | None = None,
                    block_q: int = 64, block_k: int = 64, scale: float | None = None) -> Tensor:
    """softmax(scale * q k^T + mask) v, computed tile by tile with FlashAttention's own backward.

    q [batch, heads, T_q, head_dim]; k, v [batch, kv_heads, T_k, head_dim], kv_heads dividing heads
    (grouped-query attention: each key/value head serves heads / kv_heads query heads).
    `attn_mask` broadcasts to [batch, heads, T_q, T_k]: boolean (True = may attend) or additive
    float (treated as a constant: no gradient flows into it). Pass a padding mask as
    [batch, 1, 1, T_k] so that it is never expanded to T_q x T_k. `scale` defaults to
    1/sqrt(head_dim). Half-precision inputs accumulate in float32.
    """
    _check(q, k, v, attn_mask, block_q, block_k)
    if k.shape[1] != q.shape[1]:  # grouped-query attention: repeat each KV head for its query heads
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _FlashAttention.apply(q, k, v, attn_mask, causal, scale, block_q, block_k)


def _check(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, block_q: int, block_k: int) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise EmberError("flash_attention takes q, k and v shaped [batch, heads, time, head_dim].")
    if k.shape != v.shape:
        raise EmberError(f"k and v must have the same shape, not {tuple(k.shape)} and {tuple(v.shape)}.")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise EmberError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch and head_dim.")
    if q.shape[1] % k.shape[1]:
        raise EmberError(f"The {k.shape[1]} key/value heads must divide the {q.shape[1]} query heads.")
    if block_q < 1 or block_k < 1:
        raise EmberError("block_q and block_k must be at least 1.")
    if attn_mask is not None:
        try:
            torch.broadcast_shapes(attn_mask.shape, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
        except RuntimeError:
            raise EmberError(f"attn_mask {tuple(attn_mask.shape)} does not broadcast to [batch, heads, T_q, T_k] = "
                             f"{[q.shape[0], q.shape[1], q.shape[2], k.shape[2]]}.") from None


def _tile_bias(attn_mask: Tensor | None, causal: bool, q_rows: slice, k_cols: slice, shape: tuple[int, ...],
               dtype: torch.dtype, device: torch.device) -> Tensor | None:
    """The additive mask of one tile (0 where a query may attend, -inf where not), or None.

    The user's mask is expanded as a view and sliced, so only this tile is ever made.
    """
    bias = None
    if attn_mask is not None:
        tile = attn_mask.expand(shape)[:, :, q_rows, k_cols]
        if tile.dtype == torch.bool:
            bias = torch.zeros(tile.shape, dtype=dtype, device=device).masked_fill_(~tile, float("-inf"))
        else:
            bias = tile.to(dtype)
    if causal:
        rows = torch.arange(q_rows.start, q_rows.stop, device=device)[:, None]
        cols = torch.arange(k_cols.start, k_cols.stop, device=device)[None, :]
        future = torch.zeros(rows.shape[0], cols.shape[1], dtype=dtype, device=device)
        future.masked_fill_(cols > rows, float("-inf"))  # key j after query i: not visible
        bias = future if bias is None else bias + future
    return bias


def _key_blocks(q_start: int, q_stop: int, t_k: int, block_k: int, causal: bool) -> range:
    """Key-block starts a query block needs: with a causal mask, none that lie wholly in its future."""
    stop = min(t_k, q_stop) if causal else t_k  # query q_stop-1 sees keys up to q_stop-1
    return range(0, stop, block_k)


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, causal: bool, scale: float,
                block_q: int, block_k: int) -> Tensor:
        batch, heads, t_q, dim = q.shape
        t_k = k.shape[2]
        acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        full = (batch, heads, t_q, t_k)
        out = torch.zeros(batch, heads, t_q, v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.full((batch, heads, t_q), float("-inf"), dtype=acc, device=q.device)
        for qs in range(0, t_q, block_q):
            rows = slice(qs, min(qs + block_q, t_q))
            q_i = q[:, :, rows].to(acc)
            o_i = torch.zeros(*q_i.shape[:-1], v.shape[-1], dtype=acc, device=q.device)  # O~_i
            m_i = torch.full(q_i.shape[:-1], float("-inf"), dtype=acc, device=q.device)  # running max
            l_i = torch.zeros(q_i.shape[:-1], dtype=acc, device=q.device)  # running sum
            for ks in _key_blocks(rows.start, rows.stop, t_k, block_k, causal):
                cols = slice(ks, min(ks + block_k, t_k))
                s_ij = scale * (q_i @ k[:, :, cols].to(acc).transpose(-1, -2))  # S_ij = scale Q_i K_j^T
                bias = _tile_bias(attn_mask, causal, rows, cols, full, acc, q.device)
                if bias is not None:
                    s_ij = s_ij + bias
                m_new = torch.maximum(m_i, s_ij.amax(dim=-1))  # m_new = max(m, rowmax(S_ij))
                # A row that has seen only masked keys keeps m = -inf; exp(-inf - (-inf)) would be
                # NaN, so such rows subtract 0 instead (their P~ is exp(-inf) = 0 either way).
                m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
                p_ij = torch.exp(s_ij - m_safe[..., None])  # P~_ij = exp(S_ij - m_new)
                correction = torch.exp(m_i - m_safe)  # exp(m - m_new): rescales what was summed before
                l_i = correction * l_i + p_ij.sum(dim=-1)  # l = exp(m - m_new) l + rowsum(P~_ij)
                o_i = correction[..., None] * o_i + p_ij @ v[:, :, cols].to(acc)  # O~_i update
                m_i = m_new
            seen = l_i > 0  # rows with at least one key they may attend to
            out[:, :, rows] = (o_i / torch.where(seen, l_i, torch.ones_like(l_i))[..., None]).to(q.dtype)  # O_i = O~_i / l
            lse[:, :, rows] = torch.where(seen, m_i + torch.log(l_i), torch.full_like(l_i, float("-inf")))  # L_i = m + log l
        ctx.save_for_backward(q, k, v, out, lse, attn_mask if attn_mask is not None else torch.empty(0))
        ctx.has_mask, ctx.causal, ctx.scale, ctx.block_q, ctx.block_k = attn_mask is not None, causal, scale, block_q, block_k
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse, attn_mask = ctx.saved_tensors
        attn_mask = attn_mask if ctx.has_mask else None
        causal, scale, block_q, block_k = ctx.causal, ctx.scale, ctx.block_q, ctx.block_k
        batch, heads, t_q, _ = q.shape
        t_k = k.shape[2]
        acc = lse.dtype
        full = (batch, heads, t_q, t_k)
        d_out = grad_out.to(acc)
        delta = (d_out * out.to(acc)).sum(dim=-1)  # D = rowsum(dO o O)
        # A fully masked row has L = -inf and P = 0: make exp(S - L) = exp(-inf - (+inf)) = 0.
        lse_safe = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=q.device)
        dv = torch.zeros(v.shape, dtype=acc, device=q.device)
        for ks in range(0, t_k, block_k):  # outer loop over key blocks: dK_j, dV_j stay in place
            cols = slice(ks, min(ks + block_k, t_k))
            k_j, v_j = k[:, :, cols].to(acc), v[:, :, cols].to(acc)
            first_q = ks if causal else 0  # query rows before key ks never see it under a causal mask
            for qs in range((first_q // block_q) * block_q, t_q, block_q):
                rows = slice(qs, min(qs + block_q, t_q))
                q_i, do_i = q[:, :, rows].to(acc), d_out[:, :, rows]
                s_ij = scale * (q_i @ k_j.transpose(-1, -2))
                bias = _tile_bias(attn_mask, causal, rows, cols, full, acc, q.device)
                if bias is not None:
                    s_ij = s_ij + bias
                p_ij = torch.exp(s_ij - lse_safe[:, :, rows, None])  # P_ij = exp(S_ij - L_i), recomputed
                dv[:, :, cols] += p_ij.transpose(-1, -2) @ do_i  # dV_j += P_ij^T dO_i
                dp_ij = do_i @ v_j.transpose(-1, -2)  # dP_ij = dO_i V_j^T
                ds_ij = p_ij * (dp_ij - delta[:, :, rows, None])  # dS_ij = P_ij o (dP_ij - D_i)
                dq[:, :, rows] += scale * (ds_ij @ k_j)  # dQ_i += scale dS_ij K_j
                dk[:, :, cols] += scale * (ds_ij.transpose(-1, -2) @ q_i)  # dK_j += scale dS_ij^T Q_i
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None
