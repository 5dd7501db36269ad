"""LLaDA's sampler for masked diffusion (Nie et al. 2025, arXiv 2502.09992, Appendix B,
Algorithms 4 and 5; ``generate.py`` of the LLaDA code): a fixed number of tokens per step,
chosen by remasking, optionally in semi-autoregressive blocks.

**Fixed number per step.** A span of n target (generated) positions decoded in S steps
unmasks exactly k_j tokens at step j, spread as LLaDA's ``get_num_transfer_tokens`` does:
k_j = ⌊n/S⌋ + 1 for the first n mod S steps, ⌊n/S⌋ after (so Σ_j k_j = n).

**A step.** The network predicts every still-masked position of the current block; a
token x̂ is drawn at each of them from p_θ(x0 | x_t) (after temperature / top-k / top-p;
argmax at temperature 0); then per row the k_j positions of highest confidence take their
x̂ and the others stay masked ("remasked"):

  * ``low_confidence``: confidence = p_θ(x̂ | x_t) under the *unfiltered* softmax of the
    logits (LLaDA: ``softmax(logits)`` gathered at the drawn token, temperature 1);
  * ``random``: confidence = a uniform draw per position (LLaDA's ``torch.rand``).

Ties go to the leftmost position (a stable sort).

**Blocks** (``block_length`` > 0, Algorithm 5). Each row's target positions, in order, are
cut into blocks of ``block_length`` positions: block b holds the row's targets of rank
b·block_length … (b+1)·block_length − 1, counting only target positions (clean and padded
positions are skipped). With a prompt this is LLaDA's layout — blocks start right after each
row's prompt, the first block's first position is the first generated one; with scattered
clean positions (infilling), the holes are decoded left to right, block_length targets at a
time. Blocks are decoded one after another; a later block's positions are not decoded (their
confidence is −∞, and the network is not even asked for them) until their turn. The number
of blocks is ⌈max_row n / block_length⌉ (a row with fewer targets has empty last blocks);
``steps`` is split over the blocks as evenly as possible (LLaDA requires it to divide; here
the first ``steps mod blocks`` blocks get one extra step, and a block gets at least one step
when steps < blocks). ``block_length`` 0 (or ≥ the targets of every row) is one block: the
plain schedule, exactly.

Each step runs the network only on the rows that unmask something at that step;
``nfe`` is in full-batch equivalents (``self.stats`` has the calls). A time-conditioned model
gets, per row, the t whose masking probability 1 − α_t is the fraction of the row's targets
still masked (LLaDA's models have no time input).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlm.settings import setting
from dlm.processes.masked import MaskedProcess
from dlm.samplers.base import DiffusionSamplerSettings, Sampler, filter_logits, sample_categorical, start_from_prior
from dlm.samplers.masked_ancestral import NetworkCalls, evaluate_rows, time_of_alpha

REMASKING = ("low_confidence", "random")


@dataclass
class LLaDASettings(DiffusionSamplerSettings):
    remasking: str = setting("low_confidence", choices=REMASKING)  # which predictions to keep: low_confidence | random
    block_length: int = setting(0, lo=0)  # target positions per semi-autoregressive block; 0: one block


def transfer_counts(n: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, steps) tokens to unmask at each step for n (B,) positions: ⌊n/S⌋, plus one in the
    first n mod S steps (LLaDA's get_num_transfer_tokens)."""
    base, rem = n // steps, n % steps
    return base[:, None] + (torch.arange(steps, device=n.device)[None] < rem[:, None]).long()


def block_steps(steps: int, blocks: int) -> list[int]:
    """``steps`` split over ``blocks`` as evenly as possible, the first ones taking the remainder; ≥ 1 each."""
    return [max(1, steps // blocks + (b < steps % blocks)) for b in range(blocks)]


def top_k_per_row(confidence: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the k[b] positions of highest ``confidence`` in row b (ties: leftmost)."""
    order = torch.sort(confidence, dim=-1, descending=True, stable=True).indices
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    return rank < k[:, None]


class LLaDASampler(Sampler):
    name = "llada"
    Settings = LLaDASettings

    @torch.no_grad()
    def sample(self, model, process: MaskedProcess, given, clean, generator, time_conditioned: bool, pad=None):
        """(B, L) tokens and the network evaluations (full-batch equivalents); ``clean``
        positions are kept as in ``given``."""
        st = self.settings
        num, device = given.shape[0], given.device
        x, fixed = start_from_prior(process, given, clean, pad, generator)  # (B, L)
        target = ~fixed
        n_target = target.sum(-1)  # (B,)
        counter = NetworkCalls(num)
        self.record(x)
        longest = int(n_target.max()) if num else 0
        if longest == 0:
            self.stats = counter.as_dict()
            return x, 0
        length = st.block_length if 0 < st.block_length < longest else longest
        rank = target.long().cumsum(-1) - 1  # (B, L): rank of each target among its row's targets
        block_of = torch.where(target, rank // length, torch.full_like(rank, -1))
        num_blocks = -(-longest // length)
        for b, steps in enumerate(block_steps(st.steps, num_blocks)):
            in_block = block_of == b
            counts = transfer_counts(in_block.sum(-1), steps)  # (B, steps)
            for j in range(steps):
                k = counts[:, j]
                if not bool(k.any()):
                    continue
                rows = k > 0
                cand = (x == process.mask_id) & in_block & rows[:, None]  # (B, L): where a token is drawn
                t_batch = None
                if time_conditioned:  # 1 − α_t = the fraction of the row's targets still masked
                    frac = ((x == process.mask_id) & target).sum(-1).double() / n_target.clamp_min(1).double()
                    t_batch = time_of_alpha(process.schedule, 1.0 - frac).float()
                logits = evaluate_rows(model, x, cand, t_batch, pad, counter, rows=rows)  # (n, V)
                drawn = sample_categorical(filter_logits(logits, self.options), generator)  # (n,)
                confidence = torch.full(x.shape, float("-inf"), dtype=torch.float64, device=device)
                if st.remasking == "low_confidence":
                    confidence[cand] = logits.double().softmax(-1).gather(-1, drawn[:, None])[:, 0]
                else:
                    u = torch.rand(x.shape, generator=generator, device=device, dtype=torch.float64)
                    confidence[cand] = u[cand]
                keep = top_k_per_row(confidence, k) & cand
                proposal = x.clone()
                proposal[cand] = drawn
                x = torch.where(keep, proposal, x)
                self.record(x)
        self.stats = counter.as_dict()
        return x, counter.nfe
