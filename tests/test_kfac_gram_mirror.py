"""KFAC's Gram sums mirrored by the task of their last product (GramSums with the pass's rows known).

Every sum is checked against Σ_m v_m v_mᵀ formed row by row in float64 (v_m = [u_m, c_m] with the bias's column),
before :meth:`GramSums.finish` (the early mirror alone) and after it, and for exact symmetry.
"""

from __future__ import annotations

import pytest
import reference as ref
import torch

import fisherlab.structures.base as base_module
import fisherlab.structures.kfac as kfac_module
from fisherlab.structures.base import symmetrize_upper
from fisherlab.structures.kfac import SPLIT_ROWS, GramSums, run_grams

F64 = torch.float64
CPU = torch.device("cpu")


def _row_sum(chunks: list[torch.Tensor], bias: list[torch.Tensor] | None) -> torch.Tensor:
    """Σ_m v_m v_mᵀ over the chunks' rows, v_m = [u_m, c_m] (c: the bias's column, None: v_m = u_m)."""
    V = torch.cat([torch.cat([U, c.unsqueeze(1)], 1) for U, c in zip(chunks, bias, strict=True)] if bias else chunks)
    return sum(torch.outer(v, v) for v in V)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("side_by_side", [True, False], ids=["side-by-side", "one-after-the-other"])
@pytest.mark.parametrize("announced", ["exact", "too-few", "unknown", "off"])
def test_sums_mirrored_by_their_last_product(threads, side_by_side, announced, monkeypatch):
    """Three chunks of keys of widths 300 (with a bias column), 301, 0 (bias only) and 7, side by side (on two
    threads) or one after the other (below SIDE_BY_SIDE_WORK). Announced rows ``exact``: each sum is exactly
    symmetric and equal to its row sum right after the last chunk's products (finish only scales it; below
    SIDE_BY_SIDE_WORK they run on one thread, as with one intra-op thread); ``too-few`` (the first two
    chunks' rows: mirrored after the second, changed by the third), ``unknown`` (no pass_rows) and ``off``
    (early_mirror=False): finish mirrors it."""
    if side_by_side:
        monkeypatch.setattr(kfac_module, "SIDE_BY_SIDE_WORK", 0)
    early = announced == "exact"
    g = torch.Generator().manual_seed(11)
    widths = {"a": (300, True), "b": (301, False), "c": (0, True), "d": (7, False)}  # a and b: equal work
    sizes = (130, 1, 9)  # 140 rows in chunks of 130, 1 and 9
    chunks = [{k: torch.randn(m, w, generator=g, dtype=F64) for k, (w, _) in widths.items()} for m in sizes]
    bias = [torch.rand(m, generator=g, dtype=F64) for m in sizes]
    rows = {"exact": sum(sizes), "too-few": sizes[0] + sizes[1], "unknown": None, "off": sum(sizes)}[announced]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        acc = GramSums(early_mirror=announced != "off")
        for chunk, c in zip(chunks, bias, strict=True):
            for k, U in chunk.items():
                acc.add(k, U, c if widths[k][1] else None, pass_rows=rows)
            run_grams([acc], CPU)
        for k, (_, has_bias) in widths.items():
            expected = _row_sum([c[k] for c in chunks], bias if has_bias else None)
            assert acc.needs_mirror(k) == (not early), k
            if early:
                assert torch.equal(acc[k], acc[k].T), k
                ref.assert_close(acc[k], expected, 1e-14, f"key {k} before finish, {threads} thread(s)")
            got = acc.finish(k, 2.0)()
            ref.assert_close(got, 2 * expected, 1e-14, f"key {k}, {announced}, {threads} thread(s)")
            assert torch.equal(got, got.T), k
    finally:
        torch.set_num_threads(before)


def test_dominant_product_on_all_threads_leaves_the_mirror_to_finish(monkeypatch):
    """Above SIDE_BY_SIDE_WORK on two threads, a product of more than half the work (too few rows to split) runs
    alone on both threads, one after the other with a small one; its announced last product does not mirror
    (finish does, side by side): the sums equal their row sums and are exactly symmetric after finish."""
    monkeypatch.setattr(kfac_module, "SIDE_BY_SIDE_WORK", 0)
    g = torch.Generator().manual_seed(13)
    chunks = [{"big": torch.randn(m, 300, generator=g, dtype=F64), "small": torch.randn(m, 7, generator=g, dtype=F64)}
              for m in (130, 9)]  # 139 rows < SPLIT_ROWS · 2: no split
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        acc = GramSums()
        for chunk in chunks:
            for k, U in chunk.items():
                acc.add(k, U, pass_rows=139)
            run_grams([acc], CPU)
        for k in ("big", "small"):
            assert acc.needs_mirror(k), k
            got = acc.finish(k, 0.5)()
            ref.assert_close(got, 0.5 * _row_sum([c[k] for c in chunks], None), 1e-14, k)
            assert torch.equal(got, got.T), k
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [2, 3])
def test_split_product_mirrored_after_its_scratch_sums(threads, monkeypatch):
    """A dominant product split over the threads' rows (scratch sums added afterwards) that is its sum's last is
    mirrored once the scratch sums are added: over two chunks, with a bias column, beside a small key."""
    monkeypatch.setattr(kfac_module, "SIDE_BY_SIDE_WORK", 0)
    g = torch.Generator().manual_seed(12)
    big = [torch.randn(m, 40, generator=g, dtype=F64) for m in (SPLIT_ROWS * 3 + 5, SPLIT_ROWS * threads)]
    small = [torch.randn(70, 6, generator=g, dtype=F64) for _ in big]
    weights = [torch.rand(U.shape[0], generator=g, dtype=F64) for U in big]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        acc = GramSums()
        for U, c, W in zip(big, weights, small, strict=True):
            acc.add("big", U, c, pass_rows=sum(B.shape[0] for B in big))
            acc.add("small", W, pass_rows=140)
            run_grams([acc], CPU)
    finally:
        torch.set_num_threads(before)
    for key, expected in (("big", _row_sum(big, weights)), ("small", _row_sum(small, None))):
        assert not acc.needs_mirror(key)
        assert torch.equal(acc[key], acc[key].T), key
        ref.assert_close(acc[key], expected, 1e-13, f"{key}, {threads} threads")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("early_mirror", [True, False], ids=["early", "finish"])
def test_sums_scaled_in_their_mirror_pass(threads, early_mirror, monkeypatch):
    """GramSums(scale=...): a sum mirrored by its last product's task is scaled in the same pass (complete and scaled
    right after run_grams; finish returns it as it is), else by finish (mirror and scale together), on one or two
    threads (side by side), against the scaled float64 row sums; the factor is read once the sum is complete."""
    monkeypatch.setattr(kfac_module, "SIDE_BY_SIDE_WORK", 0)
    g = torch.Generator().manual_seed(13)
    widths = {"a": (300, True), "b": (301, False)}
    sizes = (130, 10)
    chunks = [{k: torch.randn(m, w, generator=g, dtype=F64) for k, (w, _) in widths.items()} for m in sizes]
    bias = [torch.rand(m, generator=g, dtype=F64) for m in sizes]
    factors: dict[str, float] = {}  # set only after the last chunk is queued
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        acc = GramSums(early_mirror=early_mirror, scale=lambda k: factors[k])
        for i, (chunk, c) in enumerate(zip(chunks, bias, strict=True)):
            for k, U in chunk.items():
                acc.add(k, U, c if widths[k][1] else None, pass_rows=sum(sizes))
            if i == len(chunks) - 1:
                factors.update(a=0.3, b=1 / 7)
            run_grams([acc], CPU)
        for k, (_, has_bias) in widths.items():
            expected = factors[k] * _row_sum([c[k] for c in chunks], bias if has_bias else None)
            if early_mirror:
                assert not acc.needs_mirror(k)
                ref.assert_close(acc[k], expected, 1e-14, f"key {k} after run_grams, {threads} thread(s)")
            got = acc.finish(k)()
            ref.assert_close(got, expected, 1e-14, f"key {k}, {threads} thread(s)")
            assert torch.equal(got, got.T), k
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
def test_symmetrize_upper_scaled_in_one_pass(threads):
    """symmetrize_upper(scale=s) (one pass on one thread, a multiplication afterwards on two), in place or not, over
    an upper triangle whose lower part is NaN: s · (triu(M) + triu(M, 1)ᵀ) bit for bit, M's lower part untouched
    when not in place."""
    g = torch.Generator().manual_seed(14)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n in (1, 129, 300):
            for dtype in (torch.float32, F64):
                M = torch.randn(n, n, generator=g, dtype=dtype).triu() + torch.full((n, n), float("nan"),
                                                                                    dtype=dtype).tril(-1)
                for s in (0.3, torch.tensor(1 / 7, dtype=dtype)):
                    expected = (torch.triu(M) + torch.triu(M, 1).T) * s
                    assert torch.equal(symmetrize_upper(M, scale=s), expected), (n, dtype)
                    assert bool(M.tril(-1).isnan().sum() == n * (n - 1) // 2)
                    X = M.clone()
                    assert symmetrize_upper(X, inplace=True, scale=s) is X
                    assert torch.equal(X, expected), (n, dtype, "in place")
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
def test_symmetrize_upper_whole_and_tiled_against_float64(threads):
    """Both sides of MIRROR_WHOLE (P ≤ 181 whole, P = 182 and P = 300 in tiles), float32 upper triangles (lower part
    NaN), in place or not, unscaled and scaled by a float or a 0-dim tensor: the float64 mirror image of the upper
    triangle entry by entry (loops), times s in float64, rounded once to float32 — a float32 product is exact in
    float64, so this is the correctly rounded s·m_ij and the result must equal it bit for bit."""
    assert 181 ** 2 <= base_module.MIRROR_WHOLE < 182 ** 2
    g = torch.Generator().manual_seed(15)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n in (1, 2, 65, 129, 181, 182, 300):
            upper = torch.randn(n, n, generator=g).triu()
            M = upper + torch.full((n, n), float("nan")).tril(-1)
            exact = torch.empty(n, n, dtype=F64)
            for i in range(n):
                for j in range(i, n):
                    exact[i, j] = exact[j, i] = float(upper[i, j])
            for s in (None, 0.3, torch.tensor(1 / 7)):
                factor = 1.0 if s is None else float(torch.as_tensor(s).to(torch.float32))
                expected = (exact * factor).to(torch.float32)
                assert torch.equal(symmetrize_upper(M, scale=s), expected), (n, s)
                assert bool(M.tril(-1).isnan().sum() == n * (n - 1) // 2), (n, "M's lower part left as it was")
                X = M.clone()
                assert symmetrize_upper(X, inplace=True, scale=s) is X
                assert torch.equal(X, expected), (n, s, "in place")
    finally:
        torch.set_num_threads(before)
