"""The mixed-batch kernels as pure functions (``peft_nola.tuners.lowrank.mixed_batch``), without a model: for any
layout of a batch (segments of any sizes and order, ``"__base__"`` and adapters of other groups between them,
repeats), :func:`grouped_delta` gives every sample the update a naive per-sample loop computes from the formula in
its docstring, ``delta_i = ((h_i preᵀ) mids[g_i]ᵀ ups[g_i]ᵀ) postᵀ``, and :func:`sample_layout` places each sample
exactly once."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_nola.tuners.lowrank.mixed_batch import FactorGroup, grouped_delta, sample_layout

GROUP = ("a", "b", "c", "d")
OUTSIDE = ("__base__", "x")  # samples another group (or none) serves


def naive_delta(h, names, group):
    """The formula, one sample at a time, in float64."""
    rows = []
    for i, name in enumerate(names):
        if name not in group.names:
            continue
        g = group.names.index(name)
        x = h[i]
        if group.pre is not None:
            x = x @ group.pre.T
        x = x @ group.mids[g].T
        if group.ups is not None:
            x = x @ group.ups[g].T
        if group.post is not None:
            x = x @ group.post.T
        rows.append((i, x))
    return rows


def make_group(num, cols, rows, rank, with_pre, with_ups, with_post, seed):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    inner = rank if with_pre else cols  # width after the shared ``pre``
    mid = rank
    up_out = rank if with_post else rows
    pre = rand(rank, cols) if with_pre else None
    mids = rand(num, mid, inner)
    ups = rand(num, up_out, mid) if with_ups else None
    if not with_ups and not with_post:
        mids = rand(num, rows, inner)
    post = rand(rows, up_out if with_ups else mid) if with_post else None
    return FactorGroup(GROUP[:num], pre, mids, ups, post)


layouts = st.integers(1, 4).flatmap(lambda num: st.tuples(
    st.just(num), st.lists(st.sampled_from(GROUP[:num] + OUTSIDE), min_size=1, max_size=14))).filter(
    lambda t: any(name in GROUP[: t[0]] for name in t[1]))  # a layer asks only for groups some sample uses


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(layout=layouts, tokens=st.sampled_from([None, 1, 3]), with_pre=st.booleans(), with_ups=st.booleans(),
       with_post=st.booleans(), seed=st.integers(0, 2**16))
def test_grouped_delta_equals_the_formula_per_sample(layout, tokens, with_pre, with_ups, with_post, seed):
    num, names = layout
    cols, rows, rank = 5, 6, 3
    group = make_group(num, cols, rows, rank, with_pre, with_ups, with_post, seed)
    shape = (len(names), cols) if tokens is None else (len(names), tokens, cols)
    h = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    samples, delta = grouped_delta(h, names, group, rows)
    expected = naive_delta(h, names, group)
    positions = list(range(len(names))) if samples is None else samples.tolist()
    assert positions == [i for i, _ in expected], (names, positions)
    assert delta.shape == (len(expected), *shape[1:-1], rows)
    for row, (_, want) in zip(delta, expected):
        torch.testing.assert_close(row, want, rtol=1e-12, atol=1e-12)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(layout=layouts)
def test_sample_layout_places_every_sample_once(layout):
    num, names = layout
    group = GROUP[:num]
    layout_ = sample_layout(tuple(names), group, torch.device("cpu"))
    members = [i for i, name in enumerate(names) if name in group]
    n = len(members)
    assert (list(range(len(names))) if layout_.samples is None else layout_.samples.tolist()) == members
    if layout_.slots is not None:  # one row per sample, its adapter's index
        assert layout_.slots.tolist() == [group.index(names[i]) for i in members]
        return
    gather = list(range(n + layout_.padded)) if layout_.gather is None else layout_.gather.tolist()
    assert len(gather) % num == 0
    length = len(gather) // num
    assert layout_.padded == (len(gather) > n)
    # segment g holds exactly the samples of adapter g, in batch order, then padding rows (index n)
    for g, name in enumerate(group):
        segment = gather[g * length : (g + 1) * length]
        mine = [j for j, i in enumerate(members) if names[i] == name]
        assert segment == mine + [n] * (length - len(mine))
    back = list(range(n)) if layout_.back is None else layout_.back.tolist()
    assert [gather[row] for row in back] == list(range(n))


@pytest.mark.parametrize("names", [
    ["a"] * 5 + ["b"] * 4,  # gather == range(n + 1): the padding row is needed all the same
    ["a"] * 4 + ["b"] * 5,
    ["a"] * 3 + ["__base__"] * 4 + ["b"] * 2,
    ["__base__", "__base__", "b", "b", "b", "b", "b", "a", "a"],
])
def test_unequal_segments_of_issue_23(names):
    group = make_group(2, 5, 6, 3, False, True, False, 0)
    h = torch.randn(len(names), 2, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    samples, delta = grouped_delta(h, names, group, 6)
    expected = naive_delta(h, names, group)
    assert (list(range(len(names))) if samples is None else samples.tolist()) == [i for i, _ in expected]
    torch.testing.assert_close(delta, torch.stack([want for _, want in expected]), rtol=1e-12, atol=1e-12)
