"""Any objective, its output layer and loss run a chunk of rows at a time.

The output layer of a large vocabulary makes the biggest tensor of a training step: (N, V)
float32 logits at the N scored positions (and the uniform-state NELBO holds a few more of
that size). ``train.loss_chunk_rows`` = R > 0 scores the batch R sequences at a time, each
chunk's logits and loss under activation checkpointing: the forward keeps only the chunk's
result, the backward recomputes one chunk's logits at a time. Peak memory for the logits is
then O(R · L · V) instead of O(B · L · V), for every objective, at the price of running the
output layer twice. Every objective is a sum over sequences, so the chunks' per-sequence nats
and counts are exactly those of the whole batch (tested to equal the plain loss in value and
gradient). Objectives draw no randomness in ``__call__`` (their noise is drawn beforehand in
``draw``), so the recomputation is exact.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from dlm.objectives.base import Corrupted, Objective, Scored
from dlm.objectives.fused import fused_ce, linear_layer


def chunked_score(objective: Objective, c: Corrupted, where: torch.Tensor, process, rows: int, head, h):
    """Scored of ``objective`` from hidden states h (N, C) at ``where`` (B, L), ``rows`` sequences
    of the batch at a time (a ``head_fn`` for ``Transformer.forward``)."""
    B = where.shape[0]
    offsets = [0, *torch.cumsum(where.sum(-1), 0).tolist()]  # where each row's positions start in h
    nats, counts = [], []
    for r in range(0, B, rows):
        sl = slice(r, min(r + rows, B))
        part = c.rows(sl)
        part_where = where[sl]

        def score(hidden, part=part, part_where=part_where):
            s = objective(head(hidden).float(), part, part_where, process)
            return s.nats, s.count

        n, k = checkpoint(score, h[offsets[sl.start]:offsets[sl.stop]], use_reentrant=False)
        nats.append(n)
        counts.append(k)
    return Scored(torch.cat(nats), torch.cat(counts))


def dense_score(weighted: tuple[torch.Tensor, torch.Tensor], c: Corrupted, rows: int, head, h,
                compiled: bool = False, fused: bool = False):
    """Scored of a weighted cross-entropy objective, ``weighted`` = its
    ``Objective.token_weights`` ((B, L) weights, (B,) count), from hidden
    states h (B, L, C) at *every* position, the weights zero where nothing is scored: static
    shapes, no boolean gather and no host synchronisation, at the price of the output layer
    at the unscored positions too (none for AR on packed text; for MDLM the unmasked ones).
    ``rows`` > 0: that many sequences at a time under activation checkpointing, as
    :func:`chunked_score` (a ``head_fn`` for ``Transformer.forward``). ``compiled`` (``train.compile``):
    the head and its loss as one ``torch.compile``d function (whole batches; chunks stay eager).
    ``fused`` (``train.fused_head``): the fused head and loss of :mod:`dlm.objectives.fused`
    instead, where the head is a linear layer (with ``compiled``: its per-chunk softmax and
    gradient compiled; the chunks' matmuls are cuBLAS's either way)."""
    weights, count = weighted
    layer = linear_layer(head) if fused else None
    if layer is not None:
        return Scored(fused_ce(*layer, h, c.x0, weights, compiled=compiled).sum(-1), count)
    if compiled and not rows:
        return Scored(compiled_weighted_ce()(head, h, c.x0, weights), count)
    B = h.shape[0]
    step = rows or B
    nats = []
    for r in range(0, B, step):
        part = (h[r:r + step], c.x0[r:r + step], weights[r:r + step])
        nats.append(checkpoint(weighted_ce, head, *part, use_reentrant=False) if rows else weighted_ce(head, *part))
    return Scored(torch.cat(nats), count)


_COMPILED = []


def compiled_weighted_ce():
    """:func:`weighted_ce` under ``torch.compile``, built once per process."""
    if not _COMPILED:
        _COMPILED.append(torch.compile(weighted_ce, dynamic=False))
    return _COMPILED[0]


def weighted_ce(head, h: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B,) Σ_l weights_bl · −log softmax(head(h_bl))[target_bl]: the logits in the compute
    dtype (bf16 under autocast), their log-sum-exp and the picked logit in float32."""
    logits = head(h)  # (B, L, V)
    picked = logits.gather(-1, target[..., None])[..., 0].float()
    return ((logits.float().logsumexp(-1) - picked) * weights).sum(-1)
