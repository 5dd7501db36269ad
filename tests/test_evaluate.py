import math

import numpy as np
import pytest

from dlm.data import TOKENIZERS
from dlm.evaluate import select_blocks, unigram_references

TEXT = "the cat sat on the mat; the dog sat on the log. " * 50


@pytest.mark.parametrize("kind", ["byte", "char"])
def test_byte_unigram_equals_token_unigram_when_tokens_are_bytes(kind):
    tok = TOKENIZERS.get(kind).build([TEXT], 0)
    ids = tok.encode(TEXT)
    blocks = select_blocks(ids[: 64 * 10], 64, 0)
    ref = unigram_references(tok, ids, blocks)
    # equal up to add-½ smoothing, spread over the tokenizer's vocabulary vs over 256 bytes
    assert ref["unigram_bits_per_byte"] == pytest.approx(ref["byte_unigram_bits_per_byte"], rel=0.03)
    counts = np.bincount(ids, minlength=256)[np.bincount(ids, minlength=256) > 0]
    p = counts / counts.sum()
    entropy_bits = float(-(p * np.log2(p)).sum())
    assert ref["byte_unigram_bits_per_byte"] == pytest.approx(entropy_bits, rel=0.03)


def test_bpe_token_unigram_is_a_stronger_reference_than_the_byte_unigram():
    tok = TOKENIZERS.get("bpe").build([TEXT], 300)
    ids = tok.encode(TEXT)
    ref = unigram_references(tok, ids, select_blocks(ids, 16, 0))
    assert ref["unigram_bits_per_byte"] < ref["byte_unigram_bits_per_byte"]


def test_select_blocks_spreads_evenly():
    stream = np.arange(1000)
    b = select_blocks(stream, 10, 50)
    assert b.shape == (5, 10) and b[0, 0] == 0 and b[-1, 0] == 990
    assert select_blocks(stream, 10, 0).shape == (100, 10)
    assert math.isclose(len(select_blocks(stream, 10, 10_000)), 100)
