"""What every sampler shares: its settings, its contract, temperature / top-k / top-p
filtering and float64 Gumbel-max.

A sampler takes the given tokens as values ``given`` (B, L) and a ``clean`` mask (B, L):
clean positions are kept exactly as given (a prompt, the sides of a hole; they may differ
per row and sit anywhere), every other position is generated. Settings come from the run
config's ``sampler:`` section, checked against the sampler's ``Settings`` dataclass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from dlm.settings import check_settings, setting


@dataclass
class SamplerSettings:
    """Settings every sampler has (``sampler.steps``, ``sampler.temperature``, …)."""

    steps: int = setting(128, lo=1)  # denoising steps (the autoregressive sampler takes one per token)
    temperature: float = setting(1.0, lo=0)  # 0: greedy
    top_k: int = setting(0, lo=0)  # 0: off
    top_p: float = setting(1.0, lo=0, hi=1, lo_open=True)  # 1: off

    def check(self) -> None:
        check_settings(self, "sampler.")


@dataclass
class DiffusionSamplerSettings(SamplerSettings):
    """Settings every diffusion sampler has, beside the common ones."""

    # classifier-free guidance weight w: logits = cond + w·(cond − uncond) (LLaDA / Nie et al.'s
    # convention: p ∝ p(x|c)^(1+w) / p(x)^w), the unconditional pass made by hiding the clean
    # tokens (unsupervised CFG); 0: unguided, exactly
    guidance: float = setting(0.0, lo=0)


# The trace hook (``dlm sample --trace``): while :func:`recording` is active, every sampler's
# ``record(x)`` appends its whole state (B, L) to the list it yields — at the start and after
# every step, so the last frame is the returned sample. A hook, not a wrapper around the model:
# the model a sampler calls does not see the whole state (the ancestral cache and LLaDA run
# only some rows, the uniform and D3PM samplers chunk them, Fast-dLLM's KV cache passes one
# block, the autoregressive sampler one new token).
_TRACE: ContextVar[list | None] = ContextVar("dlm_sampler_trace", default=None)
UNSET = -1  # in a trace frame: a position not generated yet (the autoregressive sampler's)


@contextmanager
def recording():
    """Collect the states every sampler called inside this block records: yields the list of
    (B, L) CPU id tensors, one per frame (UNSET where a position does not exist yet)."""
    frames: list[torch.Tensor] = []
    token = _TRACE.set(frames)
    try:
        yield frames
    finally:
        _TRACE.reset(token)


SamplingOptions = SamplerSettings  # the name the library used before samplers had their own settings


def start_from_prior(process, given: torch.Tensor, clean: torch.Tensor, pad: torch.Tensor | None,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_1, fixed): the prior at every generated position, the given tokens where ``fixed``
    (clean, or padding) — where every diffusion sampler starts."""
    fixed = clean if pad is None else clean | pad
    return torch.where(fixed, given, process.prior(given.shape, generator, given.device)), fixed


class Sampler(ABC):
    """The contract every registered sampler follows (``tests/test_contracts.py``): built from
    its checked ``Settings``; ``sample`` walks the process backwards with the model and
    returns (B, L) tokens of the data vocabulary — no absorbing state left — with every
    ``clean`` position exactly as in ``given``, repeatable under ``generator``, and the
    network evaluations it took (an int ≥ 1, in full-batch equivalents)."""

    name: str
    Settings: type = SamplerSettings

    def __init__(self, settings: SamplerSettings | None = None):
        self.settings = settings if settings is not None else self.Settings()
        self.options = self.settings  # temperature / top-k / top-p, as filter_logits reads them

    @abstractmethod
    def sample(self, model, process, given: torch.Tensor, clean: torch.Tensor, generator: torch.Generator,
               time_conditioned: bool = False, pad: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """``model`` the (possibly guided) network; ``process`` the run's forward process (or
        :class:`~dlm.processes.causal.Causal`); ``given`` (B, L) tokens and ``clean`` (B, L) the
        ones to keep; ``time_conditioned`` whether the model takes t; ``pad`` (B, L) padding.
        It calls :meth:`record` with its whole state at the start and after every step."""

    def record(self, x: torch.Tensor) -> None:
        """The trace hook: the sampler's whole state ``x`` (B, L) of ids (a sampler of vector
        states passes their nearest tokens), copied while :func:`recording` is on."""
        frames = _TRACE.get()
        if frames is not None:
            frames.append(x.detach().to("cpu", copy=True))


def filter_logits(logits: torch.Tensor, opts: SamplingOptions) -> torch.Tensor:
    """float64 logits (…, V) after temperature, top-k and nucleus (top-p) filtering.

    Temperature 0 means greedy: every token but the argmax gets −inf.
    """
    logits = logits.double()
    if opts.temperature == 0:
        keep = logits == logits.max(dim=-1, keepdim=True).values
        return logits.masked_fill(~keep, float("-inf"))
    logits = logits / opts.temperature
    if opts.top_k and opts.top_k < logits.shape[-1]:
        kth = torch.topk(logits, opts.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if opts.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token once the mass before it already reaches top_p (the top token always stays)
        drop_sorted = probs.cumsum(-1) - probs >= opts.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_categorical(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """argmax(logits + Gumbel) in float64: (…, V) → (…,).

    float32 Gumbel noise truncates the tail of the distribution (rare tokens are never
    drawn), which lowers sample entropy; see Zheng et al. 2024 (arXiv 2409.02908).
    """
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
    return (logits.double() + gumbel).argmax(dim=-1)
