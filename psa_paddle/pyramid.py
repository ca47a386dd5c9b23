"""Mean-pooled K/V pyramid: level r averages r consecutive tokens of a block."""
from __future__ import annotations

import paddle

PYRAMID_LEVELS = (1, 2, 4, 8)


def block_layout(Lq: int, Lk: int, blk: int, q_offset: int):
    """Absolute block geometry shared by every step -> (nKB, qb0, nQB, front, back).

    Block n holds absolute positions [n*blk, (n+1)*blk). Queries sit at q_offset + i, so the
    query blocks are qb0 .. nKB-1; padding a query tensor with `front` rows before and `back`
    rows after aligns it to those blocks.
    """
    if not 0 <= q_offset or q_offset + Lq != Lk:
        raise ValueError(f"need q_offset + Lq == Lk, got q_offset={q_offset}, Lq={Lq}, Lk={Lk}")
    nKB = -(-Lk // blk)
    qb0 = q_offset // blk
    return nKB, qb0, nKB - qb0, q_offset - qb0 * blk, nKB * blk - Lk


def pad_to_block(x: paddle.Tensor, blk: int) -> paddle.Tensor:
    """[B, H, L, D] -> [B, H, ceil(L/blk)*blk, D], padding by repeating the last token.

    Replication (not zeros) keeps a pooled group that straddles the end an average of real
    keys; such groups are never visible to a real query anyway (their last position >= L).
    """
    B, H, L, D = x.shape
    pad = -L % blk
    if pad == 0:
        return x
    return paddle.concat([x, x[:, :, L - 1 : L].expand([B, H, pad, D])], axis=2)


def pool2(x: paddle.Tensor) -> paddle.Tensor:
    """[B, H, L, D] -> [B, H, L/2, D], mean of each aligned pair."""
    B, H, L, D = x.shape
    return x.reshape([B, H, L // 2, 2, D]).mean(axis=3)


def build_pyramid(x: paddle.Tensor, blk: int) -> list:
    """[B, H, L, D] -> [x1, x2, x4, x8], xr: [B, H, ceil(L/blk)*blk/r, D], same dtype as x.

    Pass float32 in for exact pooling: pairwise means of bf16 lose bits at every level.
    """
    if blk % PYRAMID_LEVELS[-1]:
        raise ValueError(f"block size {blk} must be a multiple of {PYRAMID_LEVELS[-1]}")
    out = [pad_to_block(x, blk)]
    for _ in PYRAMID_LEVELS[1:]:
        out.append(pool2(out[-1]))
    return out
