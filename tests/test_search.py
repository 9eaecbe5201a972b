"""The 1:N search loop (`pipeline.scoring.search`) against brute force: the products of the whole gallery by the
same canonical blocks (`products`, so every value has the same bits), reduced by sorting. Awkward sizes: gallery
and probe counts off the block side, spans that cut blocks, segments that cut blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.identify.operands import MemoryGallery
from pipeline.identify.state import SearchState, _unique_identities, merge_states
from pipeline.scoring.blockmath import CHUNK, block_spans, products
from pipeline.scoring.search import IdentityScores, TopScores, gallery_chunks, search, top_columns


def _operands(n_gallery: int, n_probes: int, d: int = 19, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n_gallery, d)).astype(np.float32),
            rng.standard_normal((n_probes, d)).astype(np.float32))  # fmt: skip


def _brute_top(values: np.ndarray, r: int, floor: np.ndarray | None = None) -> np.ndarray:
    """[probes, r]: each probe's r best (sorted) of `values` [gallery, probes]."""
    return -np.sort(-values, axis=0)[:r].T if len(values) >= r else top_columns(values.T, r)


@pytest.mark.parametrize("span", [(0, 1337), (5, 1337), (511, 1025), (700, 701)])
def test_gallery_chunks_cover_the_span_with_whole_blocks(span):
    blocks = block_spans(1337, CHUNK)
    chunks = gallery_chunks(1337, span, rows=600)
    assert chunks[0][0] <= span[0] and chunks[-1][1] >= span[1]
    starts = {a for a, _ in blocks} | {1337}
    assert all(a in starts and b in starts for a, b in chunks)
    assert all(b1 == a2 for (_, b1), (a2, _) in zip(chunks, chunks[1:], strict=False))


@pytest.mark.parametrize("n_gallery, n_probes, r", [(1337, 611, 7), (3000, 513, 50), (40, 77, 50)])
def test_top_scores_equal_brute_force(n_gallery, n_probes, r):
    gallery, probes = _operands(n_gallery, n_probes)
    values = products(gallery, probes)  # the same canonical blocks as the search
    cuts = [c for c in (10, 1000) if c < n_gallery] + [n_gallery]
    top = TopScores(n_probes, r, cuts)
    search(probes, MemoryGallery(gallery), (0, n_gallery), top, rows=1024)
    best, seg = top.finish()
    np.testing.assert_array_equal(best, _brute_top(values, r))
    edges = [0, *cuts]
    expect = np.stack([values[a:b].max(axis=0) for a, b in zip(edges, edges[1:], strict=False)], axis=1)
    np.testing.assert_array_equal(seg, expect)


def test_top_scores_with_a_floor_keep_what_counts():
    """Every value at or above a probe's floor (up to r), and each probe's best whatever its floor."""
    gallery, probes = _operands(2600, 300, seed=3)
    values = products(gallery, probes)
    floor = np.quantile(values, 0.995, axis=0).astype(np.float32)
    floor[::3] = np.inf  # probes that are never mated: only their best counts
    top = TopScores(300, 20, [2600], floor)
    search(probes, MemoryGallery(gallery), (0, 2600), top)
    best, _ = top.finish()
    ref = _brute_top(values, 20)
    np.testing.assert_array_equal(best[:, 0], ref[:, 0])
    for p in range(300):
        keep = ref[p] >= floor[p]
        np.testing.assert_array_equal(best[p][: keep.sum()], ref[p][keep])


def test_spans_merge_into_the_whole():
    """Top scores of three spans that cut blocks, merged, equal the whole gallery's, bit for bit."""
    gallery, probes = _operands(2100, 130, seed=5)
    r, cuts = 9, [1000, 2100]

    def state(span):
        top = TopScores(130, r, cuts)
        search(probes, MemoryGallery(gallery), span, top, rows=512)
        d, seg = top.finish()
        empty = np.zeros((1, 130, r), np.float32)
        return SearchState(np.full((1, 130), -np.inf, np.float32), empty - np.inf, empty.astype(np.int32) - 1, d, seg)

    whole = state((0, 2100))
    merged = merge_states([state((0, 333)), state((333, 1500)), state((1500, 2100))])
    np.testing.assert_array_equal(merged.distractors, whole.distractors)
    np.testing.assert_array_equal(merged.segments, whole.segments)


def test_identity_scores_equal_brute_force():
    gallery, probes = _operands(1500, 257, seed=7)
    ids = np.sort(np.random.default_rng(1).integers(0, 400, size=1500))
    ids = np.unique(ids, return_inverse=True)[1]  # 0..people-1, increasing
    values = products(gallery, probes)
    red = IdentityScores(257, ids, ids.max() + 1)
    search(probes, MemoryGallery(gallery), (0, 1500), red, rows=700)
    expect = np.full((257, ids.max() + 1), -np.inf, np.float32)
    for k in range(ids.max() + 1):
        expect[:, k] = values[ids == k].max(axis=0)
    np.testing.assert_array_equal(red.result(), expect)


def test_the_tensor_branch_agrees():
    """The GPU's branch (torch products, topk, index_reduce), here on the CPU: the same values up to rounding."""
    gallery, probes = _operands(1800, 90, seed=11)
    values = products(gallery, probes)
    top = TopScores(90, 12, [1000, 1800])
    search(torch.from_numpy(probes), MemoryGallery(gallery), (0, 1800), top, rows=700)
    best, seg = top.finish()
    np.testing.assert_allclose(best, _brute_top(values, 12), rtol=0, atol=1e-5)
    np.testing.assert_allclose(seg[:, 1], values[1000:].max(axis=0), rtol=0, atol=1e-5)
    ids = np.repeat(np.arange(600), 3)
    red = IdentityScores(90, ids, 600)
    search(torch.from_numpy(probes), MemoryGallery(gallery), (0, 1800), red, rows=700)
    np.testing.assert_allclose(red.result(), values.reshape(600, 3, 90).max(axis=1).T, rtol=0, atol=1e-5)


def test_an_identity_in_two_spans_counts_once():
    vals = np.array([[0.9, 0.5, 0.8, 0.7]], np.float32)
    ids = np.array([[3, 4, 3, -1]], np.int32)
    v, i = _unique_identities(vals, ids)
    kept = sorted(zip(v[0].tolist(), i[0].tolist(), strict=True), reverse=True)
    assert kept[:3] == [(pytest.approx(0.9), 3), (pytest.approx(0.7), -1), (pytest.approx(0.5), 4)]
    assert kept[3][0] == -np.inf
