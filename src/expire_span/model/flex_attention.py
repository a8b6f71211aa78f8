"""``attention="flex"``: PyTorch FlexAttention driven by the policy's per-key mask description.

The policy describes its mask as a :class:`~expire_span.policies.flex_mask.FlexMask` (per-key
spans and ages, per-head spans, a window): no ``[B, T, N]`` bias is built. This module makes of it

- the ``score_mod``: the bias (Expire-Span's ``log m`` from each key's span and step) computed
  inside the kernel; gradients reach the spans through FlexAttention's backward (CUDA only);
- a block mask of tiles of :data:`BLOCK_SIZE` queries x :data:`BLOCK_SIZE` keys, from the range of
  queries each key is visible to: a tile where every key is hidden for every query (expired for
  the whole query tile, or in its future) is never computed, a tile where every entry is visible
  skips the ``mask_mod``. So compute follows what is kept, tile by tile;
- the average memory size (the layer's statistic), counted from the same ranges.

Where it runs. On CUDA the call goes through ``torch.compile(flex_attention)`` (a fused Triton
kernel; compiled once per dtype and mask form, shapes dynamic after the first change; set
``EXPIRE_SPAN_FLEX_COMPILE=0`` to run it uncompiled). On CPU compiled flex is not used: the
uncompiled FlexAttention materialises the scores (the reference implementation), which is for
checking forward values only: PyTorch has no CPU backward for FlexAttention, so training with
gradients on CPU raises (use ``attention="sdpa"`` there). Uncompiled, only the ``mask_mod`` is
applied, not the tiles: the tiles are therefore applied here inside the ``mask_mod`` (a key of a
skipped tile is hidden, a key of a full tile is shown), so that the CPU forward computes exactly
what the sparse kernel does and the tests check the block mask too.

FlexAttention has no dropout on the attention probabilities: with ``dropout > 0`` they are not
dropped (the residual and feed-forward dropouts still are); a warning says so once.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from expire_span.policies.flex_mask import FlexMask, MaskMod

BLOCK_SIZE = 128
"""Query and key tile of the block mask (FlexAttention's default sparse block)."""

CPU_GRADIENT_ERROR = (
    "attention='flex' cannot train on CPU: PyTorch's FlexAttention has no CPU backward (use "
    "attention='sdpa' on CPU; flex runs forward-only there, under torch.no_grad())"
)

_compiled: Any = None
_dropout_warned = False


@dataclass
class FlexPlan:
    """One block's mask for FlexAttention: the policy's description, its tiles, its statistic.

    Attributes:
        mask: the policy's description.
        num_queries, num_keys: T and N.
        block: the tile size.
        partial: ``[B, 1 or H, Tq, Tk]`` bool, tiles with some visible entry but not only.
        full: ``[B, 1 or H, Tq, Tk]`` bool, tiles whose every entry is visible.
        memory_size: average number of earlier steps a query sees with nonzero weight (the
            layer's ``memory_size``; the query itself excluded).
        row_memory_size: ``[B]``, the same for each sample.
    """

    mask: FlexMask
    num_queries: int
    num_keys: int
    block: int
    partial: Tensor
    full: Tensor
    memory_size: Tensor
    row_memory_size: Tensor

    @classmethod
    def build(cls, mask: FlexMask, num_queries: int, num_keys: int,
              block: int | None = None) -> FlexPlan:
        block = BLOCK_SIZE if block is None else block
        with torch.no_grad():
            lo, hi, uncertain = mask.query_ranges(num_queries)  # [B, Hm, N]
            rows = lo.shape[0] * lo.shape[1] * num_queries
            memory_size = (hi - lo).sum() / rows - 1.0
            row_memory_size = (hi - lo).sum(dim=(1, 2)) / (rows // lo.shape[0]) - 1.0
            partial, full = _tiles(lo, hi, uncertain, num_queries, num_keys, block)
        return cls(mask, num_queries, num_keys, block, partial, full, memory_size,
                   row_memory_size)

    def block_mask(self, emulate_tiles: bool = False) -> Any:
        """FlexAttention's ``BlockMask``; with ``emulate_tiles`` its ``mask_mod`` also applies
        the tiles (for the uncompiled implementation, which reads only the ``mask_mod``)."""
        from torch.nn.attention.flex_attention import BlockMask

        visible = self.mask.mask_mod()
        mask_mod = _with_tiles(visible, self.partial, self.full, self.block) if emulate_tiles \
            else visible
        partial_count, partial_index = _ordered(self.partial)
        full_count, full_index = _ordered(self.full)
        return BlockMask.from_kv_blocks(
            partial_count, partial_index, full_count, full_index, BLOCK_SIZE=self.block,
            mask_mod=mask_mod, seq_lengths=(self.num_queries, self.num_keys),
        )

    def sparsity(self) -> float:
        """Fraction of the tiles that are skipped."""
        return 1.0 - float((self.partial | self.full).float().mean())


def _tiles(lo: Tensor, hi: Tensor, uncertain: int, num_queries: int, num_keys: int,
           block: int) -> tuple[Tensor, Tensor]:
    """``(partial, full)`` tiles from each key's visible queries ``[lo, hi)``: a tile is
    computed if some key may be visible to some of its queries (the range widened by
    ``uncertain``), and full if every key surely is to every query (narrowed)."""
    q_tiles, k_tiles = -(-num_queries // block), -(-num_keys // block)
    starts = torch.arange(q_tiles, device=lo.device) * block
    ends = (starts + block).clamp(max=num_queries)
    lo, hi = lo.unsqueeze(2), hi.unsqueeze(2)  # [B, Hm, 1, N]
    some = (lo < hi + uncertain) & (lo < ends.view(-1, 1)) & (hi + uncertain > starts.view(-1, 1))
    every = (lo <= starts.view(-1, 1)) & (hi - uncertain >= ends.view(-1, 1))
    pad = k_tiles * block - num_keys  # absent keys: never visible, and the tile never full
    some = torch.nn.functional.pad(some, (0, pad), value=False)
    every = torch.nn.functional.pad(every, (0, pad), value=False)
    shape = (*some.shape[:3], k_tiles, block)
    some, every = some.view(shape).any(dim=-1), every.view(shape).all(dim=-1)
    return some & ~every, every


def _ordered(tiles: Tensor) -> tuple[Tensor, Tensor]:
    """``(count, index)`` of FlexAttention's ``from_kv_blocks``: per query tile, how many key
    tiles are listed and which (listed ones first)."""
    count = tiles.sum(dim=-1, dtype=torch.int32)
    index = torch.argsort((~tiles).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
    return count, index


def _with_tiles(visible: MaskMod, partial: Tensor, full: Tensor, block: int) -> MaskMod:
    """``visible`` restricted to the listed tiles, and true on full tiles: what the sparse
    kernel computes."""
    per_head = partial.shape[1] > 1

    def mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        head = h if per_head else 0
        tile_q, tile_k = q // block, kv // block
        return full[b, head, tile_q, tile_k] | (partial[b, head, tile_q, tile_k]
                                                & visible(b, h, q, kv))

    return mod


def flex_attend(q: Tensor, k: Tensor, v: Tensor, plan: FlexPlan, dropout: float) -> Tensor:
    """``softmax(q k^T / sqrt(d) + bias) v`` with the bias and the visibility of ``plan``.

    ``q`` ``[B, H, T, d]``, ``k``, ``v`` ``[B, H, N, d]``; returns ``[B, H, T, d]``.
    """
    from torch.nn.attention.flex_attention import flex_attention

    global _dropout_warned
    if dropout > 0 and not _dropout_warned:
        _dropout_warned = True
        warnings.warn("attention='flex' applies no dropout to the attention probabilities "
                      "(FlexAttention has none); the other dropouts are applied", stacklevel=2)
    compiled = q.device.type == "cuda" and os.environ.get("EXPIRE_SPAN_FLEX_COMPILE", "1") != "0"
    if q.device.type == "cpu" and torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad or _captures_grad(plan.mask)
    ):
        raise RuntimeError(CPU_GRADIENT_ERROR)
    block_mask = plan.block_mask(emulate_tiles=not compiled)
    score_mod = plan.mask.score_mod()
    if not compiled:  # the reference implementation, by choice: no need to say so each time
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "flex_attention called without torch.compile")
            return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
    return _compiled_flex()(q, k, v, score_mod=score_mod, block_mask=block_mask)


def _compiled_flex() -> Any:
    global _compiled
    if _compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled = torch.compile(flex_attention)
    return _compiled


def _captures_grad(mask: FlexMask) -> bool:
    return any(isinstance(value, Tensor) and value.requires_grad
               for value in vars(mask).values())
