"""A family ties a forward process, an objective, a sampler and a backbone together.

The training loop, the evaluator and the CLI only talk to this interface; they never ask
which family is in use. Adding a family is one new file here and one registry line.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from dlm.backbones import Transformer, TransformerConfig, resolve_size
from dlm.config import RunConfig
from dlm.samplers import SamplingOptions


class Family(ABC):
    name: ClassVar[str]
    causal: ClassVar[bool] = False
    is_bound: ClassVar[bool] = True  # False: ``nll`` is exact; True: an upper bound (NELBO)
    default_time_conditioning: ClassVar[bool] = False

    def __init__(self, cfg: RunConfig, vocab_size: int, eos_id: int):
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        tc = cfg.time_conditioning
        self.time_conditioned = self.default_time_conditioning if tc is None else tc

    @property
    def input_vocab_size(self) -> int:
        return self.vocab_size

    def build_model(self) -> Transformer:
        size = resolve_size(self.cfg.model)
        return Transformer(
            TransformerConfig(
                vocab_in=self.input_vocab_size,
                vocab_out=self.vocab_size,
                n_layer=size.n_layer,
                n_head=size.n_head,
                d_model=size.d_model,
                causal=self.causal,
                cond_dim=self.cfg.model.cond_dim if self.time_conditioned else 0,
                mlp_ratio=self.cfg.model.mlp_ratio,
                dropout=self.cfg.model.dropout,
            )
        )

    @abstractmethod
    def loss(self, model: Transformer, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Training loss of a batch x0 (B, L): a scalar in nats per token."""

    @abstractmethod
    def nll(self, model: Transformer, x0: torch.Tensor, generator: torch.Generator, mc_samples: int) -> torch.Tensor:
        """−log p(x0) per sequence in nats, (B,): exact, or an upper bound averaged over
        ``mc_samples`` Monte Carlo draws when ``is_bound``."""

    @abstractmethod
    def sample(
        self,
        model: Transformer,
        num: int,
        length: int,
        prompt: torch.Tensor | None,
        generator: torch.Generator,
        steps: int,
        options: SamplingOptions,
    ) -> tuple[torch.Tensor, int]:
        """(num, length) tokens, prompt prefix included, and the number of network calls."""
