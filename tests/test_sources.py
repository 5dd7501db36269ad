"""Synthetic sources of known entropy rate (dlm.data.sources): the exact figures against
definitions (a normalised distribution, a stationary π, the entropy rate and block figure
against the source's own text), the exact judge, and `--data markov2` as a corpus."""

import itertools
import math

import numpy as np
import pytest

from dlm.data.corpora import load_corpus
from dlm.data.sources import SOURCES, MarkovSource, SourceJudge, source_of


def small(**kw) -> MarkovSource:
    return MarkovSource("t", "abc", **{"order": 2, "successors": 2, "smoothing": 0.1, "length": 60_000, **kw})


@pytest.mark.parametrize("order", [1, 2, 3])
def test_sequence_probabilities_sum_to_one(order):
    src = small(order=order, successors=2)
    total = sum(math.exp(-src.nll(np.array(seq)).sum()) for seq in itertools.product(range(3), repeat=4))
    assert total == pytest.approx(1.0, abs=1e-12)


def test_stationary_and_transitions():
    src = small()
    K, n = src.K, src.K ** src.order
    assert np.allclose(src.table.sum(1), 1.0) and (src.table >= src.smoothing / K - 1e-15).all()
    # one step of the chain on contexts leaves π where it is
    nxt = np.zeros(n)
    for c in range(n):
        for s in range(K):
            nxt[(c * K + s) % n] += src.stationary[c] * src.table[c, s]
    assert np.allclose(nxt, src.stationary, atol=1e-13)
    # the likely successors: `successors` per context, the rest at the smoothing floor
    assert ((src.table > src.smoothing / K).sum(1) == src.successors).all()


def test_entropy_rate_and_block_figure_match_the_sources_own_text():
    src = small(length=80_000)
    ids = src.encode(src.text())
    per = src.nll(ids)
    tail = per[src.order:]
    assert tail.mean() == pytest.approx(src.entropy_rate, abs=4 * tail.std() / math.sqrt(len(tail)))
    L = 16
    blocks = ids[: len(ids) // L * L].reshape(-1, L)
    block = np.array([src.nll(b).mean() for b in blocks])
    assert block.mean() == pytest.approx(src.block_entropy(L), abs=4 * block.std() / math.sqrt(len(block)))
    assert src.block_entropy(L) > src.entropy_rate  # a block's first symbols cost their marginals
    assert src.likely(ids).mean() == pytest.approx(src.likely_share, abs=0.01)


def test_reference_samples_score_what_their_order_learned():
    src = small(length=20_000)
    judge = SourceJudge(src)
    bits = [judge.figures(src.reference_samples(k, 200, 16, seed=1))["source_bits_per_token"] for k in range(3)]
    assert bits[0] > bits[1] > bits[2]
    assert bits[2] == pytest.approx(src.block_entropy(16) / math.log(2), abs=0.08)  # the source's own samples


def test_pool_restricts_a_contexts_successors_to_its_last_symbols_pool():
    src = small(pool=2, successors=1)
    K = src.K
    for last in range(K):
        likely = {int(s) for c in range(last, K ** src.order, K) for s in np.flatnonzero(src.table[c] > src.smoothing / K)}
        assert len(likely) <= 2


def test_the_judge_scores_exactly_and_charges_foreign_characters():
    src = SOURCES.get("markov2")
    judge = SourceJudge(src)
    text = src.text()[:500]
    nll, count = judge.score([text, text[:100] + "?" + text[100:200]])
    assert nll[0] == pytest.approx(src.nll(src.encode(text)).sum())
    worst = -math.log(src.smoothing / src.K)
    parts = src.nll(src.encode(text[:100])).sum() + src.nll(src.encode(text[100:200])).sum()
    assert count.tolist() == [500, 201] and nll[1] == pytest.approx(parts + worst)
    fig = judge.figures([src.text()[:20_000]])
    assert fig["source_bits_per_token"] == pytest.approx(src.entropy_rate / math.log(2), abs=0.05)
    assert 0.95 < fig["source_likely_share"] <= 1


def test_markov2_is_a_corpus_and_other_data_is_no_source():
    corpus = load_corpus("markov2", 0.05)
    train, val = "".join(corpus.docs("train")), "".join(corpus.docs("val"))
    src = source_of("markov2")
    assert len(train) + len(val) == src.length and set(train) <= set(src.symbols)
    assert corpus.fingerprint == src.fingerprint != small().fingerprint
    assert source_of("shakespeare") is None
    assert 1.2 < src.entropy_rate / math.log(2) < 1.35  # what compare-source.yaml's comment says
