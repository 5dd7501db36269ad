"""Confidence-threshold parallel decoding with a block KV cache (Fast-dLLM, Wu et al. 2025,
arXiv 2505.22618) for masked diffusion.

**Blocks.** The generated span — from the first position generated in any row to the end
of the sequence — is cut into blocks of ``block_length`` positions, decoded left to right
(semi-autoregressive, as LLaDA). Blocks are ranges of *positions*, the same for every row:
a clean (or padded) position inside a block is context and never changes; a block with no
generated position in any row is skipped (no step, no network call). So a prompt makes the
blocks start after it, an infilling template's holes are decoded left to right, and a
right context (text after a hole) is seen, never decoded.

**Steps within a block.** Each step predicts every masked position of the block and, per
row, unmasks those whose *confidence* exceeds ``threshold`` — at least one, the most
confident (ties: the leftmost). Confidence is the largest probability of the distribution
a token is drawn from: softmax of the logits after temperature / top-k / top-p filtering
(Fast-dLLM's max_x p(x_i | ·)); at temperature 0, where that distribution is one-hot, it is
taken at temperature 1 after top-k / top-p. The token is drawn from the same distribution
(float64 Gumbel-max; argmax at temperature 0). ``threshold`` ≥ 1 is never exceeded: one
token per step, the most confident.

**Step budget.** ``steps`` is shared between the blocks in proportion to the positions they
generate (at least one each). Within a block of step share S, after j steps a row with m
masked positions left in the block unmasks at least ⌈m / (S − j)⌉ (LLaDA's even schedule as
a floor under the threshold rule), so a block always finishes within its share: with
``steps`` ≥ the generated length the floor is one token per step, and threshold decoding
usually finishes a block in far fewer steps. The sampler returns the network calls made.

**Cache** (``cache``). ``none``: every step runs the full sequence (exact). ``prefix``: the
first step of a block runs the full sequence once and records every layer's keys and
values (:class:`dlm.backbones.transformer.BlockKV`); the next steps of the block run the
network only on the block and the positions after it, attending to the recorded keys and
values of the positions before the block (the settled prefix, prompt included). ``dual``:
only the block runs; the positions after it are read from the same record. For a
bidirectional model the cache is approximate — the recorded keys were computed while the
block still held the masks of the block's start — the first step of each block is exact,
and ``tests/test_fast_dllm.py`` measures how far the others are. A window call counts as
one network call; ``last_stats["positions"]`` is the mean fraction of the sequence's
positions a call computed.

A time-conditioned model gets, per row, the t whose masking probability 1 − α_t equals the
fraction of the row's generated positions still masked (the schedule inverted by
bisection).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from dlm.backbones.transformer import BlockKV
from dlm.device import to_host, true_positions
from dlm.settings import setting
from dlm.processes.masked import MaskedProcess
from dlm.samplers.base import DiffusionSamplerSettings, Sampler, filter_logits, sample_categorical, start_from_prior
from dlm.samplers.graphs import GraphedTrunk, trunk_for

CACHES = ("none", "prefix", "dual")


@dataclass
class FastDllmSettings(DiffusionSamplerSettings):
    block_length: int = setting(32, lo=1)  # positions per block, decoded left to right
    threshold: float = setting(0.9, lo=0)  # unmask where confidence > threshold (≥ 1 a step); ≥ 1: one a step
    cache: str = setting("prefix", choices=CACHES)  # none | prefix | dual


def plan_blocks(free: torch.Tensor, block_length: int, steps: int) -> list[tuple[int, int, int]]:
    """(start, end, step share) of every block that generates something, left to right.

    ``free`` (B, L): generated positions. Blocks tile [first generated position, L) in
    ``block_length`` positions; each block's share of ``steps`` is proportional to its
    positions generated in any row (cumulative rounding), at least 1."""
    return plan_counted(to_host(free.sum(0)), block_length, steps)


def plan_counted(per_position: list[int], block_length: int, steps: int) -> list[tuple[int, int, int]]:
    """:func:`plan_blocks` from the host's ``per_position`` (L,): the rows generating each position."""
    any_free = [n > 0 for n in per_position]
    if not any(any_free):
        return []
    L = len(any_free)
    first = any_free.index(True)
    blocks = [(s, min(s + block_length, L)) for s in range(first, L, block_length)]
    widths = [sum(any_free[s:e]) for s, e in blocks]
    total, cum, prev, out = sum(widths), 0, 0, []
    for (s, e), w in zip(blocks, widths):
        if w == 0:
            continue
        cum += w
        upto = (steps * cum + total // 2) // total
        out.append((s, e, max(1, upto - prev)))
        prev = upto
    return out


def time_of_masked_fraction(schedule, frac: torch.Tensor, iters: int = 50) -> torch.Tensor:
    """(B,) t with 1 − α(t) = ``frac`` (α decreasing in t), by bisection on [0, 1]."""
    lo = torch.zeros_like(frac, dtype=torch.float64)
    hi = torch.ones_like(frac, dtype=torch.float64)
    target = frac.double()
    for _ in range(iters):
        mid = (lo + hi) / 2
        below = 1.0 - schedule.alpha(mid) < target
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return ((lo + hi) / 2).float()


class FastDllmSampler(Sampler):
    name = "fast-dllm"
    Settings = FastDllmSettings

    def __init__(self, settings=None):
        super().__init__(settings)
        self.last_stats: dict = {}
        self._trunk = None  # cache none: the sample's graphed trunk, if any (trunk)

    def trunk(self, model, x: torch.Tensor, t: torch.Tensor | None, pad) -> GraphedTrunk | None:
        """``cache: none``'s whole-sequence calls as a CUDA graph at fixed (B, L) on CUDA for the
        dlm transformer (``samplers.graphs``); None: plain calls."""
        return trunk_for(model, x, t, pad)

    def _confidence(self, rows: torch.Tensor, filtered: torch.Tensor) -> torch.Tensor:
        """(N,) largest probability of the drawing distribution (temperature 1 when greedy)."""
        if self.settings.temperature == 0:
            filtered = filter_logits(rows, dataclasses.replace(self.settings, temperature=1.0))
        return filtered.softmax(-1).max(-1).values

    def _logits(self, model, x, t, where, pad, block: tuple[int, int], first: bool, kv: BlockKV | None, n: int):
        """(N, V) logits at ``where`` (all inside the block; ``n`` = N, known on the host), and
        the window width computed."""
        mode = self.settings.cache
        if mode == "none" and self._trunk is not None:  # the whole sequence through the graphed trunk
            return self._trunk.logits(self._trunk.hidden(x, t), true_positions(where, n)), x.shape[1]
        if mode == "none":
            return model(x, t, score_mask=where, pad=pad, score_count=n), x.shape[1]
        if first:  # a full pass, recording every layer's K/V for the rest of the block
            return model(x, t, score_mask=where, pad=pad, kv_out=kv, score_count=n), x.shape[1]
        start, end = block[0], (x.shape[1] if mode == "prefix" else block[1])
        logits = model(x[:, start:end], t, score_mask=where[:, start:end], pad=pad, kv_in=kv, start=start,
                       score_count=n)
        return logits, end - start

    @torch.no_grad()
    def sample(self, model, process: MaskedProcess, given, clean, generator, time_conditioned: bool, pad=None):
        """(B, L) tokens and the number of network calls; ``clean`` positions are kept as in ``given``.
        One host synchronisation before the first block (the generated positions of each row)
        and one after a step (each row's masks left in the block), none after a step that must
        end its block (its last step of the share, or every row had at most one mask left: the
        floor unmasks it): the masks left are counted on the host, positions written by index."""
        opts = self.settings
        B, L = given.shape
        device = given.device
        x, fixed = start_from_prior(process, given, clean, pad, generator)  # (B, L)
        t0 = torch.zeros(B, device=device) if time_conditioned else None
        self._trunk = self.trunk(model, x, t0, pad) if opts.cache == "none" else None
        free = ~fixed
        n_free = free.sum(-1).clamp_min(1)
        nfe, computed = 0, 0
        self.record(x)
        free_rows = to_host(free)  # (B, L): at the start every generated position is masked
        per_position = [sum(col) for col in zip(*free_rows)]
        for start, end, share in plan_counted(per_position, opts.block_length, opts.steps):
            row_left = [sum(row[start:end]) for row in free_rows]  # (B,): each row's masks left in the block
            masks_left = sum(row_left)
            in_block = torch.zeros(L, dtype=torch.bool, device=device)
            in_block[start:end] = True
            kv = None if opts.cache == "none" else BlockKV()
            for j in range(share):
                if not masks_left:
                    break
                masked = (x == process.mask_id) & in_block  # (B, L)
                t = None
                if time_conditioned:
                    frac = ((x == process.mask_id) & free).sum(-1) / n_free
                    t = time_of_masked_fraction(process.schedule, frac)
                logits, width = self._logits(model, x, t, masked, pad, (start, end), j == 0, kv, masks_left)
                nfe += 1
                computed += width
                filtered = filter_logits(logits, opts)  # (N, V) float64
                tokens = sample_categorical(filtered, generator)  # (N,)
                where = true_positions(masked, masks_left)  # (N,) flat positions of the masks, row-major
                conf = torch.full((B * L,), float("-inf"), dtype=torch.float64, device=device)
                conf = conf.scatter(0, where, self._confidence(logits, filtered)).view(B, L)
                # at least ⌈m / steps left⌉ per row (≥ 1 while masks remain): the block ends within its share
                left = masked.sum(-1)
                floor = (left + (share - j) - 1) // (share - j)  # (B,)
                rank = conf.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
                unmask = masked & ((conf > opts.threshold) | (rank < floor[:, None]))
                drawn = torch.zeros_like(x).reshape(-1).scatter(0, where, tokens).view_as(x)
                x = torch.where(unmask, drawn, x)
                if share - j == 1 or max(row_left) <= 1:  # the floor unmasks every mask left: no read
                    row_left = [0] * B
                else:
                    row_left = to_host(unmask.sum(-1).neg_().add_(left))  # the step's one host synchronisation
                masks_left = sum(row_left)
                self.record(x)
        self.last_stats = {"nfe": nfe, "positions": computed / max(1, nfe * L)}
        return x, nfe
