"""The transformer with an input projection for vectors of their own width (Plaid's
``input_linear``): a continuous process's state z (B, L, C), C the process's embedding width
(``process.embed_dim``, 16 by default) rather than the transformer's d_model, enters as
``in_proj(z)`` (B, L, d_model). The projection is the network's first layer — the process owns
the embeddings the noise is defined on (its prior, its bound's end terms), the network owns the
map from that space to its width — so it trains with the network and is saved with it
(``in_proj.*``), and the process stays free of the backbone's shape.

Everything else is the transformer's: its blocks, time conditioning, output layer, state-dict
keys (plus ``in_proj.*``) and ``cfg``. Float input given as ``x`` is taken as vectors, so the
guidance wrapper (which passes a vector state positionally) and the ``Predictor`` (which
passes it as ``embeds=``) both reach it.

Self-conditioning (``process.self_condition`` > 0): a second projection ``sc_proj`` of the
estimate x̂ (``self_cond=``, (B, L, C), the process's width) is added to ``in_proj(z)``. The
state z stays C-wide, so guidance, the prior draw, the trace and the contract tests see the
state they always did; only the callers that hold an estimate (the family's two-pass
predictor, the sampler) pass it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dlm.backbones.transformer import Transformer


class VectorInputTransformer(Transformer):
    """:class:`Transformer` whose ``embeds`` are (B, L, in_dim) vectors, projected to d_model."""

    in_proj: nn.Linear  # set by set_input_width (an annotation: a class attribute would shadow the submodule)
    sc_proj: nn.Linear | None  # the self-conditioning estimate's projection, or None (set by set_input_width)

    def set_input_width(self, in_dim: int, self_condition: bool = False) -> "VectorInputTransformer":
        """Add the projection from ``in_dim``-wide input vectors (drawn from the global RNG, like
        the rest of the network's initialisation) and, with ``self_condition``, a second one of
        the same width for the self-conditioning estimate x̂, initialised to zero (no bias): the
        network starts as if it had none, and an estimate of zeros is no estimate."""
        self.in_proj = nn.Linear(in_dim, self.d_model, bias=True)
        nn.init.normal_(self.in_proj.weight, std=1.0 / in_dim ** 0.5)
        nn.init.zeros_(self.in_proj.bias)
        self.sc_proj = nn.Linear(in_dim, self.d_model, bias=False) if self_condition else None
        if self.sc_proj is not None:
            nn.init.zeros_(self.sc_proj.weight)
        return self

    @property
    def input_width(self) -> int:
        return self.in_proj.in_features

    def forward(self, x=None, t=None, *args, embeds=None, self_cond=None, **kw):
        """The transformer's forward on vectors ``embeds`` (B, L, C) (or a float ``x``), plus
        ``self_cond`` (B, L, C): the self-conditioning estimate, added through ``sc_proj``
        (Plaid's ``input_linear`` over [z, x̂] is the same map); None is an estimate of zeros."""
        if x is not None and x.is_floating_point() and embeds is None:
            x, embeds = None, x  # a vector state passed positionally
        if self_cond is not None and self.sc_proj is None:
            raise ValueError("self_cond= is for a self-conditioned network (process.self_condition > 0)")
        if embeds is not None and x is None:
            embeds = self.project(embeds, self_cond)  # (B, L, d_model): the transformer takes it as given
        return super().forward(x, t, *args, embeds=embeds, **kw)

    def project(self, z: torch.Tensor, self_cond: torch.Tensor | None) -> torch.Tensor:
        """in_proj(z) (+ sc_proj(x̂)): (B, L, C) → (B, L, d_model)."""
        if z.dim() != 3 or z.shape[-1] != self.input_width:
            raise ValueError(f"embeds must be (B, L, {self.input_width}), got shape {tuple(z.shape)}")
        h = self.in_proj(z.to(self.in_proj.weight.dtype))
        if self_cond is None:
            return h
        if self_cond.shape != z.shape:
            raise ValueError(f"self_cond must have the shape of embeds {tuple(z.shape)}, got {tuple(self_cond.shape)}")
        return h + self.sc_proj(self_cond.to(self.sc_proj.weight.dtype))
