"""The backbone contract: the network that maps a noisy sequence to x0 logits.

A backbone only predicts; processes, objectives and samplers own the maths. Its input is a
(B, L) sequence given either as token ids ``x`` (discrete processes: masked, uniform, D3PM,
the autoregressive baseline) or as vectors ``embeds`` (B, L, d_model) (Gaussian diffusion on
embeddings, or a process that embeds and perturbs tokens itself via ``embed``); its output
is always float32 logits over ``vocab_out`` tokens.

Backbones are registered by name in :data:`BACKBONES`; :func:`dlm.backbones.build_backbone`
builds one from the run config's ``model`` section.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn as nn

from dlm.registry import Registry

if TYPE_CHECKING:
    from dlm.backbones.sizes import ModelConfig

BACKBONES: Registry[type[Backbone]] = Registry("backbone")


class Backbone(nn.Module, ABC):
    """What every backbone offers its callers.

    ``forward(x=None, t=None, *, embeds=None, score_mask=None, pad=None, head_fn=None)``:

    * ``x`` (B, L) token ids in [0, vocab_in) **or** ``embeds`` (B, L, d_model) input
      vectors — exactly one of the two (:meth:`input_vectors` checks it). ``model(x, t)``
      with ids is the call every discrete family makes; ``model(embeds=model.embed(x), t=t)``
      computes the same thing.
    * ``t`` (B,) times in [0, 1]: required by a ``time_conditioned`` backbone (it raises
      without one); a backbone that is not time-conditioned ignores it.
    * ``score_mask`` (B, L) bool: return the logits (N, vocab_out) at its N true positions,
      row-major, instead of (B, L, vocab_out) — the output layer (often the largest matmul)
      then runs only where a loss scores. ``score_count`` (an int), when given, is its number
      of true positions: a backbone may then gather them without a host synchronisation.
    * ``pad`` (B, L) bool marks padding: no position attends to a padded key, so changing a
      padded token changes no other position's output.
    * ``head_fn(head, h)``: instead of the logits, return what it makes of the output layer
      (a callable: hidden states (…, C) → logits (…, vocab_out) in the compute dtype)
      ``head`` and the final hidden states h (N, d_model) (a chunked head + loss,
      ``dlm.objectives.chunked``).

    Returns float32 logits (B, L, vocab_out), or (N, vocab_out) with ``score_mask``, or
    ``head_fn``'s result. A backbone may take more keywords (the transformer's KV and block
    caches); callers that use only these work with any backbone.

    ``embed(x)``: (B, L) ids → (B, L, d_model), the input embedding the ids path applies (a
    method, or the embedding module itself), so a process can embed tokens and corrupt the
    vectors.

    Attributes: ``d_model`` (width of ``embeds``), ``vocab_in`` (ids ``x`` may hold),
    ``vocab_out`` (logits' last dimension), ``causal`` (position i sees only positions ≤ i),
    ``time_conditioned`` (whether ``t`` is required).

    A subclass is built from the run config by :meth:`build` and registered in
    :data:`BACKBONES` under the name a config uses.
    """

    # annotations only (no class attributes): a subclass may set them in __init__ or define
    # them as properties, and ``embed`` may be a submodule (nn.Module keeps those in
    # ``_modules``, which a method of the same name on the class would shadow)
    d_model: int
    vocab_in: int
    vocab_out: int
    causal: bool
    time_conditioned: bool
    embed: Callable[[torch.Tensor], torch.Tensor]

    @classmethod
    @abstractmethod
    def build(cls, model_cfg: ModelConfig, *, vocab_in: int, vocab_out: int, causal: bool,
              cond_dim: int) -> Backbone:
        """The backbone the run config's ``model`` section describes (``cond_dim`` 0: not
        time-conditioned), raising :class:`~dlm.errors.DlmError` for a shape it cannot build."""

    @abstractmethod
    def forward(self, x: torch.Tensor | None = None, t: torch.Tensor | None = None, *,
                embeds: torch.Tensor | None = None, score_mask: torch.Tensor | None = None,
                pad: torch.Tensor | None = None, head_fn=None):
        """Logits at the ``score_mask`` positions (see the class docstring)."""

    def anneal_attention(self, allowed: torch.Tensor | None) -> None:
        """DiffuLLaMA's attention-mask annealing (``train.attention_anneal_steps``): until the
        next call, training forwards let each query attend only where ``allowed`` (L, L) bool
        is true (None: the backbone's own attention). A backbone without it refuses, in one line."""
        from dlm.errors import DlmError

        raise DlmError(f"train.attention_anneal_steps is for a pretrained causal LM adapted to diffusion "
                       f"(--init-from hf:FOLDER with a bidirectional family); this backbone is a {type(self).__name__}")

    def input_vectors(self, x: torch.Tensor | None, embeds: torch.Tensor | None) -> torch.Tensor:
        """(B, L, d_model): ``embed(x)``, or ``embeds`` as given; exactly one of the two."""
        if (x is None) == (embeds is None):
            both = "got both" if x is not None else "got neither"
            raise ValueError(f"pass the input as token ids x (B, L) or as vectors embeds (B, L, {self.d_model}), "
                             f"exactly one of the two: {both}")
        if x is not None:
            if x.dim() != 2 or x.dtype.is_floating_point:
                raise ValueError(f"x must be (B, L) token ids, got a {x.dtype} tensor of shape {tuple(x.shape)}; "
                                 f"pass vectors as embeds=")
            return self.embed(x)  # (B, L, C)
        if embeds.dim() != 3 or embeds.shape[-1] != self.d_model:
            raise ValueError(f"embeds must be (B, L, {self.d_model}), got shape {tuple(embeds.shape)}")
        return embeds
