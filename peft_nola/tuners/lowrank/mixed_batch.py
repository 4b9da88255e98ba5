"""Mixed-adapter batches as pure functions, Punica-style: sample ``i`` of a batch uses adapter ``names[i]``.

The factors of adapters with equal shapes are stacked into a :class:`FactorGroup` (each method builds its own: see
``LowRankLayer._stack_factors`` and ``NoraLayer._stack_factors``); :func:`grouped_delta` computes every sample's update
against the stacked factors with batched products, and :func:`sample_layout` says which rows go where.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

@dataclass(frozen=True)
class FactorGroup:
    """Stacked factors of adapters sharing shapes: the update of a sample using ``names[g]`` is
    ``((x preᵀ) mids[g]ᵀ ups[g]ᵀ) postᵀ``, where ``pre``/``post`` (shared by the group) and ``ups`` may be None."""

    names: tuple
    pre: Optional[torch.Tensor]
    mids: torch.Tensor
    ups: Optional[torch.Tensor]
    post: Optional[torch.Tensor]


@dataclass(frozen=True)
class SampleLayout:
    """Where the samples of one :class:`FactorGroup` go in the batched product; ``None`` marks an identity."""

    samples: Optional[torch.Tensor]  # batch positions using the group (None: all, in order)
    gather: Optional[torch.Tensor]  # rows of the segment layout (adapter-major) taken from those samples; n = padding
    padded: bool  # whether a zero row n is appended to the samples before ``gather`` (some segment is padded)
    back: Optional[torch.Tensor]  # row of each sample in the flattened product's output
    slots: Optional[torch.Tensor]  # per-sample adapter index, when segments are not used


@functools.lru_cache(maxsize=64)
def sample_layout(adapter_names: tuple, group_names: tuple, device: torch.device) -> SampleLayout:
    """The layout of the samples using an adapter of ``group_names``; see :func:`_sample_layout`. Cached for the
    whole process, so its index tensors are made outside ``torch.inference_mode()`` even when first asked for inside
    it: inference tensors could not be used by a later call that records gradients."""
    with torch.inference_mode(False):
        return _sample_layout(adapter_names, group_names, device)


def _sample_layout(adapter_names: tuple, group_names: tuple, device: torch.device) -> SampleLayout:
    """The layout of the samples using an adapter of ``group_names`` (sample ``i`` uses ``adapter_names[i]``): as
    segments, one per adapter and all of one length (padded with a zero row ``n`` where that costs at most half
    again), gathered so that one ``bmm`` covers them (SGMV); else a per-sample adapter index (BGMV)."""
    # Computed once per batch composition (every layer and decoding step reuses it); index tensors are made here, not
    # in each layer's forward. None marks an identity, which is skipped.
    index = {name: i for i, name in enumerate(group_names)}
    positions = [i for i, name in enumerate(adapter_names) if name in index]
    n = len(positions)
    per_adapter = [[] for _ in group_names]
    for j, i in enumerate(positions):
        per_adapter[index[adapter_names[i]]].append(j)
    longest = max(len(rows) for rows in per_adapter)
    samples = None if n == len(adapter_names) else torch.tensor(positions, device=device)

    def tensor_unless_identity(values):
        return None if values == list(range(len(values))) else torch.tensor(values, device=device)

    if longest * len(group_names) <= 1.5 * n:
        gather = [j for rows in per_adapter for j in rows + [n] * (longest - len(rows))]
        back = [0] * n
        for row, j in enumerate(gather):
            if j < n:
                back[j] = row
        # With padding the product has more rows than samples: ``back`` must then pick the samples' rows even when
        # they come first and in order, and the padding row ``n`` is appended even when ``gather`` keeps the order.
        padded = len(gather) > n
        return SampleLayout(samples, tensor_unless_identity(gather), padded,
                            torch.tensor(back, device=device) if padded else tensor_unless_identity(back), None)
    slots = torch.tensor([index[adapter_names[i]] for i in positions], device=device)
    return SampleLayout(samples, None, False, None, slots)


def grouped_delta(h: torch.Tensor, adapter_names: list[str], group: FactorGroup, rows: int):
    """``(samples, delta)``: the update of every sample of the batch ``h (batch, ..., cols)`` that uses an adapter of
    ``group`` (at least one does), sample ``i`` using ``adapter_names[i]``::

        delta_i = ((h_i preᵀ) mids[g_i]ᵀ ups[g_i]ᵀ) postᵀ        g_i = group.names.index(adapter_names[i])

    ``delta (len(samples), ..., rows)``; ``samples``: the batch positions of those samples (None: all of them, in
    order). Computed by batched products over the samples gathered per adapter, as Punica's SGMV/BGMV kernels do: the
    samples of one adapter form a segment, and equal-length segments (padded where that adds little) go through one
    ``bmm`` against the stacked factors without copying them per sample; otherwise each sample's factors are
    gathered (BGMV). ``h`` is already in the factors' dtype.
    """
    layout = sample_layout(tuple(adapter_names), group.names, h.device)
    out_shape = h.shape[1:-1]
    h = h.reshape(h.shape[0], -1, h.shape[-1])  # (batch, tokens, cols)
    if layout.samples is not None:
        h = h.index_select(0, layout.samples)
    if group.pre is not None:
        h = h @ group.pre.T  # shared by every adapter of the group: one product for the batch
    tokens, width = h.shape[1], h.shape[2]
    if layout.slots is None:
        if layout.padded:
            h = torch.cat([h, h.new_zeros(1, tokens, width)])
        if layout.gather is not None:
            h = h.index_select(0, layout.gather)
        h = h.reshape(len(group.names), -1, width)
        mids, ups = group.mids, group.ups
    else:
        mids = group.mids.index_select(0, layout.slots)
        ups = group.ups.index_select(0, layout.slots) if group.ups is not None else None
    h = torch.bmm(h, mids.mT)
    if ups is not None:
        h = torch.bmm(h, ups.mT)
    h = h.reshape(-1, tokens, h.shape[-1])
    if layout.back is not None:
        h = h.index_select(0, layout.back)
    if group.post is not None:
        h = h @ group.post.T
    return layout.samples, h.reshape(h.shape[0], *out_shape, rows)
