"""Synthetic sources of known entropy rate: corpora generated from an exactly known process,
so that a model's likelihood can be set against the truth and its samples judged exactly.

``MarkovSource`` is an order-``order`` Markov chain over ``symbols``: every context (the last
``order`` symbols) has ``successors`` likely next symbols with Dirichlet(``concentration``)
probabilities — drawn, when ``pool`` > 0, from a pool of ``pool`` symbols that depends on the
last symbol alone (a first-order structure that is quick to learn, refined by the older ones) —
mixed with ``smoothing`` of the uniform distribution so that every sequence has a
finite log-probability (a symbol outside a context's likely set costs −log(smoothing / K)). The
tables come from ``seed`` alone; the corpus is one document of ``length`` symbols from the
stationary start (train/val: ``dlm.data.corpora``'s tail split).

Exact figures (nats):

* ``entropy_rate``: H = Σ_c π(c) H(P(· | c)), π the stationary distribution over contexts;
* ``block_entropy(L)``: the expected −log p of a block of L symbols cut at a random point of
  the stream, seen without what came before it: H(X_1 … X_order) + (L − order)·H, per symbol;
  the least any model scored on such blocks can reach in expectation;
* ``nll(ids)``: −log p of each symbol of a sequence under the source (the first ``order``
  under the stationary marginals, every later one under its context): the exact judge.

``SOURCES`` names the built-in ones (``--data markov2``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from dlm.registry import Registry


@dataclass(frozen=True)
class MarkovSource:
    name: str
    symbols: str
    order: int = 2
    successors: int = 4
    concentration: float = 1.0
    smoothing: float = 0.02
    pool: int = 0  # > 0: a context's likely successors come from a pool of this many set by its last symbol
    seed: int = 0
    length: int = 500_000

    @property
    def K(self) -> int:
        return len(self.symbols)

    @property
    def fingerprint(self) -> str:
        """What keys the token cache: every parameter (the tables and text follow from them)."""
        text = repr((self.symbols, self.order, self.successors, self.concentration, self.smoothing, self.pool, self.seed,
                     self.length))
        return f"source:{self.name}:{hashlib.blake2b(text.encode(), digest_size=8).hexdigest()}"

    @cached_property
    def table(self) -> np.ndarray:
        """P(next | context), (K**order, K); context c = Σ_j s_j K**(order−1−j), oldest first."""
        rng = np.random.default_rng(self.seed)
        K, n = self.K, self.K ** self.order
        P = np.full((n, K), self.smoothing / K)
        pools = [rng.choice(K, size=self.pool or K, replace=False) for _ in range(K)]  # by the last symbol
        for c in range(n):
            likely = rng.choice(pools[c % K], size=self.successors, replace=False)
            P[c, likely] += (1 - self.smoothing) * rng.dirichlet(np.full(self.successors, self.concentration))
        return P

    @cached_property
    def stationary(self) -> np.ndarray:
        """π over contexts: the chain on contexts c → (c·K + s) mod K**order, by power iteration."""
        P, K, n = self.table, self.K, self.K ** self.order
        pi = np.full(n, 1.0 / n)
        shifted = (np.arange(n)[:, None] * K + np.arange(K)[None, :]) % n  # (n, K): the next context
        for _ in range(10_000):
            new = np.bincount(shifted.ravel(), weights=(pi[:, None] * P).ravel(), minlength=n)
            if np.abs(new - pi).max() < 1e-15:
                break
            pi = new
        return new / new.sum()

    @cached_property
    def entropy_rate(self) -> float:
        P = self.table
        return float(-(self.stationary * (P * np.log(P)).sum(1)).sum())

    def block_entropy(self, L: int) -> float:
        """The expected −log p per symbol of a block of ``L`` symbols seen without its past."""
        pi = self.stationary
        k = min(L, self.order)
        start = pi.reshape((self.K,) * self.order).sum(axis=tuple(range(k, self.order))).ravel()  # first k symbols
        head = float(-(start * np.log(start)).sum())
        return (head + max(0, L - self.order) * self.entropy_rate) / L

    @cached_property
    def _marginals(self) -> list[np.ndarray]:
        """log p(x_j | x_1 … x_{j−1}) for j < order, as tables over the first j + 1 symbols."""
        joint = self.stationary.reshape((self.K,) * self.order)
        out = []
        for j in range(self.order):
            m = joint.sum(axis=tuple(range(j + 1, self.order)))
            prefix = m.sum(axis=-1, keepdims=True)
            out.append(np.log(m) - np.log(prefix))
        return out

    def nll(self, ids: np.ndarray) -> np.ndarray:
        """−log p of each symbol (0 … K−1) of ``ids`` (1-D) under the source."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty(len(ids))
        for j in range(min(self.order, len(ids))):
            out[j] = -self._marginals[j][tuple(ids[: j + 1])]
        if len(ids) > self.order:
            ctx = np.zeros(len(ids) - self.order, dtype=np.int64)
            for j in range(self.order):
                ctx = ctx * self.K + ids[j: len(ids) - self.order + j]
            out[self.order:] = -np.log(self.table[ctx, ids[self.order:]])
        return out

    def likely(self, ids: np.ndarray) -> np.ndarray:
        """Whether each symbol after the first ``order`` is one of its context's likely successors."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) <= self.order:
            return np.zeros(0, dtype=bool)
        ctx = np.zeros(len(ids) - self.order, dtype=np.int64)
        for j in range(self.order):
            ctx = ctx * self.K + ids[j: len(ids) - self.order + j]
        return self.table[ctx, ids[self.order:]] > self.smoothing / self.K

    @cached_property
    def likely_share(self) -> float:
        """The share of the source's own transitions that land in the likely set (1 − smoothing·(K − s)/K)."""
        return 1.0 - self.smoothing * (self.K - self.successors) / self.K

    def text(self) -> str:
        """The corpus: ``length`` symbols from the stationary start, seeded by ``seed`` + 1."""
        return self._text

    @cached_property
    def _text(self) -> str:
        rng = np.random.default_rng(self.seed + 1)
        n = self.K ** self.order
        cdf = self.table.cumsum(1)
        c = int(rng.choice(n, p=self.stationary))
        out = np.empty(self.length, dtype=np.int64)
        head = [c // self.K ** (self.order - 1 - j) % self.K for j in range(self.order)]
        out[: self.order] = head
        u = rng.random(self.length)
        for i in range(self.order, self.length):
            s = min(int(np.searchsorted(cdf[c], u[i])), self.K - 1)
            out[i] = s
            c = (c * self.K + s) % n
        return "".join(np.asarray(list(self.symbols))[out])

    def reference_samples(self, order: int, num: int, L: int, seed: int = 0) -> list[str]:
        """``num`` texts of ``L`` symbols from the source's own order-``order`` marginal chain
        (0: its unigram, 1: its first-order chain, ``self.order``: the source): what a model
        that learned exactly that much of the source would sample."""
        rng = np.random.default_rng(seed)
        K, k = self.K, min(order, self.order)
        joint = self.stationary.reshape((K,) * self.order)
        # P(x_{k+1} | x_1 … x_k) of the stationary chain, from the joint of k + 1 consecutive symbols
        grams = joint.sum(axis=tuple(range(k + 1, self.order))) if k < self.order else joint[..., None] * \
            self.table.reshape((K,) * (self.order + 1))
        grams = grams.reshape(-1, K)
        cond = grams / grams.sum(1, keepdims=True)
        start = grams.sum(1)
        out = []
        for _ in range(num):
            c = int(rng.choice(len(start), p=start))
            ids = [c // K ** (k - 1 - j) % K for j in range(k)]
            while len(ids) < L:
                ids.append(int(rng.choice(K, p=cond[c])))
                c = (c * K + ids[-1]) % max(len(start), 1) if k else 0
            out.append("".join(self.symbols[i] for i in ids[:L]))
        return out

    def encode(self, text: str) -> np.ndarray | None:
        """Symbol ids of ``text``, or None when it holds a character that is not a symbol."""
        index = {s: i for i, s in enumerate(self.symbols)}
        try:
            return np.fromiter((index[ch] for ch in text), dtype=np.int64, count=len(text))
        except KeyError:
            return None


@dataclass(frozen=True)
class SourceJudge:
    """The source itself as a judge of samples (``dlm.judge.Judge``'s ``score``): the exact −log p
    of each document, one symbol per token. A character that is not a symbol (a sample's
    ``<unk>``) costs the source's dearest transition, −log(smoothing / K), and the next symbol
    is scored as a block start."""

    source: MarkovSource

    @property
    def name(self) -> str:
        return f"source:{self.source.name} (exact)"

    def _pieces(self, text: str) -> tuple[list[np.ndarray], int]:
        """The runs of symbols of ``text`` and the number of other characters."""
        symbols = set(self.source.symbols)
        runs = "".join(ch if ch in symbols else " " for ch in text).split()
        return [self.source.encode(r) for r in runs], sum(ch not in symbols for ch in text)

    def score(self, documents: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(total NLL in nats, number of scored tokens) of each document."""
        worst = -float(np.log(self.source.smoothing / self.source.K))
        nll, count = np.zeros(len(documents)), np.zeros(len(documents), dtype=np.int64)
        for d, text in enumerate(documents):
            pieces, foreign = self._pieces(text)
            nll[d] = sum(float(self.source.nll(p).sum()) for p in pieces) + foreign * worst
            count[d] = len(text)
        return nll, count

    def figures(self, documents: list[str]) -> dict:
        """Bits per token of ``documents`` under the source and the share of their transitions
        (after each block's first ``order`` symbols) that are a context's likely successors."""
        nll, count = self.score(documents)
        likely = [self.source.likely(p) for d in documents for p in self._pieces(d)[0]]
        flags = np.concatenate(likely) if likely else np.zeros(0, dtype=bool)
        n = int(count.sum())
        return {"source_bits_per_token": float(nll.sum() / n / np.log(2)) if n else float("nan"),
                "source_likely_share": float(flags.mean()) if len(flags) else float("nan"),
                "source_tokens": n}


SOURCES: Registry = Registry("synthetic source")
SOURCES.register("markov2")(MarkovSource("markov2", "abcdefghijklmnop", successors=3, pool=5))


def source_of(data: str) -> MarkovSource | None:
    """The synthetic source that ``data`` (a run's ``data.data``) names, if any."""
    return SOURCES.get(data) if data in SOURCES else None
