"""Named backbone sizes. Parameter counts are for the transformer body plus a 50,257-token
GPT-2 vocabulary with untied input and output embeddings (the MDLM/Duo convention)."""

from __future__ import annotations

from dataclasses import dataclass

from dlm.schema import ModelConfig
from dlm.errors import DlmError


@dataclass(frozen=True)
class Size:
    n_layer: int
    n_head: int
    d_model: int


SIZES: dict[str, Size] = {
    "tiny": Size(2, 4, 128),  # seconds on a CPU: tests and smoke runs
    "mini": Size(4, 4, 256),  # the quickstart: minutes on 2 CPU cores
    "micro": Size(6, 6, 384),
    # with the GPT-2 vocabulary: 162M parameters, 169M with adaLN time conditioning
    # (MDLM / Duo / SEDD "small")
    "small": Size(12, 12, 768),
    "medium": Size(24, 16, 1024),  # 405M with the GPT-2 vocabulary
}


def resolve_size(cfg: ModelConfig) -> Size:
    if cfg.size not in SIZES:
        raise DlmError(f"unknown model size '{cfg.size}' (choose from: {', '.join(SIZES)})")
    base = SIZES[cfg.size]
    size = Size(
        n_layer=cfg.n_layer or base.n_layer,
        n_head=cfg.n_head or base.n_head,
        d_model=cfg.d_model or base.d_model,
    )
    if size.d_model % size.n_head or (size.d_model // size.n_head) % 2:
        raise DlmError(
            f"d_model {size.d_model} must split into {size.n_head} heads of even width"
        )
    return size
