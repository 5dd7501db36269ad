"""Classifier-free guidance for every diffusion sampler, written once (unsupervised CFG of
Nie et al. 2024, arXiv 2410.18514, as LLaDA uses it).

The family wraps the model in :class:`Guided` when ``sampler.guidance`` w > 0; a sampler
calls it like the model and gets guided logits, without any code of its own:

    logits = cond + w · (cond − uncond),   i.e.  p ∝ p(x | c)^(1+w) / p(x)^w,

``cond`` the network's logits with the clean (given) tokens visible, ``uncond`` the same
call with every clean token *hidden*. w = 0 is unguided: the family then does not wrap
the model at all, so sampling is bit-identical to a run without guidance. (The other
convention, uncond + w·(cond − uncond), is unguided at w = 1 and unconditional at w = 0.)

**Hiding** (:func:`hide_clean`): a hidden position holds what the prior x_1 holds there —
[MASK] for masked diffusion; for uniform-state diffusion, which has no mask, a uniform
noise token drawn once per sample from the sampling generator (the t = 1 prior at those
positions: the network sees pure noise where the prompt was). The same hiding is the
prompt dropout of training (``train.prompt_dropout``), which teaches the model the
unconditional distribution that guidance needs.

Both passes run as one call on a doubled batch (cond rows, then uncond rows), so a
sampler's NFE counts one call per guided step, each on twice the rows. Block-cache calls
(``kv_out=`` / ``kv_in=`` with ``start=``, Fast-dLLM) are guided too: the recorded cache
then holds both halves, and a window call hides the clean tokens inside its window.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dlm.errors import DlmError


def hidden_tokens(process, shape, generator: torch.Generator, device) -> torch.Tensor:
    """(B, L) tokens a hidden clean position takes: a draw of the prior x_1 (all [MASK] for
    masked diffusion, which draws nothing from ``generator``; uniform noise for uniform-state)."""
    return process.prior(shape, generator, device)


def hide_clean(x: torch.Tensor, clean: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """x with every ``clean`` (B, L) position replaced by ``hidden``; x and hidden are (B, L)
    ids or (B, L, C) vectors (a continuous process's state)."""
    return torch.where(clean.view(*clean.shape, *[1] * (x.dim() - clean.dim())), hidden, x)


class Guided(nn.Module):
    """The model, guided: ``forward(x, t, score_mask=, pad=, **kw)`` → cond + w·(cond − uncond)
    at the ``score_mask`` positions, float32 (N, V). ``clean`` (B, L) says what to hide;
    window calls (``start=``) hide the part of it inside their window."""

    def __init__(self, model: nn.Module, process, given: torch.Tensor, clean: torch.Tensor, weight: float,
                 generator: torch.Generator):
        super().__init__()
        if not bool(clean.any()):
            raise DlmError("sampler.guidance needs given tokens to guide on (a prompt or an infilling "
                           "template): unconditional sampling has none; use sampler.guidance=0")
        self.model = model
        self.weight = float(weight)
        self.clean = clean
        self.hidden = hidden_tokens(process, given.shape, generator, given.device)  # drawn once per sample

    @property
    def cfg(self):
        return self.model.cfg

    def forward(self, x, t=None, cache=None, score_mask=None, pad=None, **kw):
        if cache is not None:
            raise ValueError("guidance does not run with an autoregressive KV cache")
        start, width = kw.get("start", 0), x.shape[1]
        clean = self.clean[:, start:start + width]
        hidden = self.hidden[:, start:start + width]
        x2 = torch.cat([x, hide_clean(x, clean, hidden)])  # (2B, T): cond rows, then uncond rows

        def twice(v):
            return None if v is None else torch.cat([v, v])

        if kw.get("score_count") is not None:  # both halves' positions
            kw["score_count"] = 2 * kw["score_count"]
        if kw.get("self_cond") is not None:  # a self-conditioning estimate (gaussian): the sampler's, for both halves
            kw["self_cond"] = twice(kw["self_cond"])
        if x2.is_floating_point():  # a continuous process's state: vectors, not ids
            kw["embeds"], x2 = x2, None
        logits = self.model(x2, twice(t), score_mask=twice(score_mask), pad=twice(pad), **kw)
        cond, uncond = logits.chunk(2)  # score_mask rows are row-major: the first half is cond
        return cond + self.weight * (cond - uncond)
