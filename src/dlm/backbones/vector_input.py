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
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dlm.backbones.transformer import Transformer


class VectorInputTransformer(Transformer):
    """:class:`Transformer` whose ``embeds`` are (B, L, in_dim) vectors, projected to d_model."""

    in_proj: nn.Linear  # set by set_input_width (an annotation: a class attribute would shadow the submodule)

    def set_input_width(self, in_dim: int) -> "VectorInputTransformer":
        """Add the projection from ``in_dim``-wide input vectors (drawn from the global RNG, like
        the rest of the network's initialisation)."""
        self.in_proj = nn.Linear(in_dim, self.d_model, bias=True)
        nn.init.normal_(self.in_proj.weight, std=1.0 / in_dim ** 0.5)
        nn.init.zeros_(self.in_proj.bias)
        return self

    @property
    def input_width(self) -> int:
        return self.in_proj.in_features

    def input_vectors(self, x: torch.Tensor | None, embeds: torch.Tensor | None) -> torch.Tensor:
        if x is not None and x.is_floating_point() and embeds is None:
            x, embeds = None, x  # a vector state passed positionally
        if embeds is None:
            return super().input_vectors(x, embeds)
        if x is not None:
            return super().input_vectors(x, embeds)  # both: refused there
        if embeds.dim() != 3 or embeds.shape[-1] != self.input_width:
            raise ValueError(f"embeds must be (B, L, {self.input_width}), got shape {tuple(embeds.shape)}")
        return self.in_proj(embeds.to(self.in_proj.weight.dtype))
