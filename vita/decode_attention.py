"""Flash-decoding over the slot KV cache (Triton): one query token per row, keys read in place.

For each row ``b`` the query ``q [B, heads, D]`` attends to positions ``[0, lengths[b])`` of cache
slot ``slot_ids[b]`` in one layer's store ``[slots, max_len, 2 * kv_heads, D]`` (key heads, then
value heads). The positions are cut into splits; one program per (row, KV head, split) folds its
keys into a running softmax for the query heads sharing that KV head, and a second kernel merges
the splits. Nothing is gathered: blocks past a row's true length are masked and read no memory;
the split count and length (host ints, fixed per CUDA graph) follow the attended-length bucket.
Products take fp32 operands (exact for bf16 inputs through tf32; also what Triton's CPU
interpreter, used by the tests, computes correctly) and accumulate in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_KEYS = 64


@triton.jit
def _split_kernel(
    q_ptr, store_ptr, slot_ids_ptr, lengths_ptr, part_out_ptr, part_max_ptr, part_sum_ptr,
    q_row_stride, q_head_stride, store_slot_stride, store_pos_stride, store_head_stride,
    scale,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    SPLITS: tl.constexpr, SPLIT_LEN: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):
    row, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot = tl.load(slot_ids_ptr + row).to(tl.int64)
    length = tl.load(lengths_ptr + row)
    group = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + group
    q = tl.load(q_ptr + row * q_row_stride + heads[:, None] * q_head_stride + dims[None, :],
                mask=group[:, None] < GROUP, other=0.0).to(tl.float32)
    best = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    start = split * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, length)
    base = store_ptr + slot * store_slot_stride
    for offset in range(0, SPLIT_LEN, BLOCK):  # blocks past the row's length load nothing
        keys = start + offset + tl.arange(0, BLOCK)
        valid = keys < end
        offsets = keys[:, None] * store_pos_stride + dims[None, :]
        k = tl.load(base + offsets + kv_head * store_head_stride, mask=valid[:, None], other=0.0).to(tl.float32)
        v = tl.load(base + offsets + (KV_HEADS + kv_head) * store_head_stride, mask=valid[:, None], other=0.0)
        v = v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=1))
        shift = tl.where(new_best == float("-inf"), 0.0, new_best)  # all masked so far: weights 0, not NaN
        weights = tl.exp(scores - shift[:, None])
        rescale = tl.exp(best - shift)
        total = total * rescale + tl.sum(weights, axis=1)
        acc = acc * rescale[:, None] + tl.dot(weights, v, input_precision=PRECISION)
        best = new_best
    part = (row * KV_HEADS * GROUP + heads) * SPLITS + split
    keep = group < GROUP
    tl.store(part_max_ptr + part, best, mask=keep)
    tl.store(part_sum_ptr + part, total, mask=keep)
    tl.store(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=keep[:, None])


@triton.jit
def _merge_kernel(
    part_out_ptr, part_max_ptr, part_sum_ptr, out_ptr,
    SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    row_head = tl.program_id(0)  # row * heads + head
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    used = splits < SPLITS
    part = row_head * SPLITS + splits
    best = tl.load(part_max_ptr + part, mask=used, other=float("-inf"))
    total = tl.load(part_sum_ptr + part, mask=used, other=0.0)
    overall = tl.max(best, axis=0)
    weight = tl.where(best > float("-inf"), tl.exp(best - overall), 0.0)
    acc = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=used[:, None], other=0.0)
    out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(total * weight, axis=0)
    tl.store(out_ptr + row_head * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty))


def splits_for(rows: int, kv_heads: int, max_keys: int, processors: int) -> int:
    """Splits per (row, KV head) that give the GPU about two programs per processor, each at
    least ``BLOCK_KEYS`` positions long."""
    wanted = max(1, -(-2 * processors // (rows * kv_heads)))
    return min(wanted, max(1, -(-max_keys // BLOCK_KEYS)))


def decode_attention(
    q: torch.Tensor, store: torch.Tensor, slot_ids: torch.Tensor, lengths: torch.Tensor, max_keys: int
) -> torch.Tensor:
    """Attention of one token per row: ``q [B, heads, D]`` (last dim contiguous) over the first
    ``lengths[b] <= max_keys`` positions of slot ``slot_ids[b]`` of ``store``. Returns ``[B, heads * D]``."""
    rows, heads, head_dim = q.shape
    kv_heads = store.shape[2] // 2
    group = heads // kv_heads
    processors = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
    splits = splits_for(rows, kv_heads, max_keys, processors)
    split_len = -(-max_keys // splits)
    split_len = -(-split_len // BLOCK_KEYS) * BLOCK_KEYS
    part_out = torch.empty(rows * heads * splits, head_dim, device=q.device, dtype=torch.float32)
    part_max = torch.empty(rows * heads * splits, device=q.device, dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # tf32 holds bf16/fp16 operands exactly
    _split_kernel[(rows, kv_heads, splits)](
        q, store, slot_ids, lengths, part_out, part_max, part_sum,
        q.stride(0), q.stride(1), store.stride(0), store.stride(1), store.stride(2),
        head_dim**-0.5,
        KV_HEADS=kv_heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        SPLITS=splits, SPLIT_LEN=split_len, BLOCK=BLOCK_KEYS, PRECISION=precision,
    )
    out = torch.empty(rows, heads * head_dim, device=q.device, dtype=q.dtype)
    _merge_kernel[(rows * heads,)](
        part_out, part_max, part_sum, out,
        SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits), HEAD_DIM=head_dim,
    )
    return out
