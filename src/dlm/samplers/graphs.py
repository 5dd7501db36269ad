"""CUDA graphs of a sampler's network calls where their shapes are fixed: what replays a
step as one launch instead of a few hundred (a small model's step on a GPU is launch-bound).

:func:`capture` records a function once (under the caller's autocast without its weight
cache: a cached cast would be freed under the graph). :class:`GraphedTrunk` is the network
of a diffusion step over the whole batch at fixed (B, L) — up to its final norm, the
output layer applied after, at the positions the step needs (their number changes every
step). The AR decoding step has its own (``samplers.autoregressive.GraphReadyDecoder``).
Both run the same function eagerly without ``graph`` (the CPU tests compare it with the
sampler's plain calls token for token).
"""

from __future__ import annotations

import torch

WARMUP = 2  # eager runs on a side stream before a capture (what capturing asks first)


def capture(fn):
    """(graph, output): ``fn()`` recorded in a ``torch.cuda.CUDAGraph`` (nothing runs: replay it)."""
    graph = torch.cuda.CUDAGraph()
    dtype = torch.get_autocast_dtype("cuda")
    with torch.autocast("cuda", dtype=dtype, enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False):
        with torch.cuda.graph(graph):
            out = fn()
    return graph, out


def on_side_stream(fn):
    """``fn()`` run eagerly on a side stream, ordered after and before the current one."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = fn()
    torch.cuda.current_stream().wait_stream(side)
    return out


def _hidden(head, h):  # a head_fn: the final norm's output, the output layer left for later
    return h


class GraphedTrunk:
    """``hidden(x, t)``: the network's final hidden states (B, L, C) over the whole batch from
    fixed input buffers (x, t and ``pad`` keep their first call's shapes); ``logits(h, at)``:
    float32 logits (N, V) at flat positions ``at``. With ``graph`` (CUDA) the trunk is
    captured after :data:`WARMUP` eager runs and replayed; without, it runs eagerly."""

    def __init__(self, model, x: torch.Tensor, t: torch.Tensor | None, pad: torch.Tensor | None, graph: bool):
        self.model, self.pad, self.graph = model, pad, graph
        self.x = torch.empty_like(x)
        self.t = None if t is None else torch.empty_like(t)
        self.runs, self.h = 0, None

    def _trunk(self) -> torch.Tensor:
        return self.model(self.x, self.t, pad=self.pad, head_fn=_hidden)

    def hidden(self, x: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        self.x.copy_(x)
        if t is not None:
            self.t.copy_(t)
        self.runs += 1
        if not self.graph:
            return self._trunk()
        if self.runs <= WARMUP:
            return on_side_stream(self._trunk)
        if not isinstance(self.graph, torch.cuda.CUDAGraph):
            self.graph, self.h = capture(self._trunk)
        self.graph.replay()
        return self.h

    def logits(self, h: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        return self.model.logits_of(h.reshape(-1, h.shape[-1])[at]).float()


def trunk_for(model, x: torch.Tensor, t: torch.Tensor | None, pad) -> GraphedTrunk | None:
    """A graphed trunk for a sampler's whole-batch calls on CUDA, for a model that is
    graph-ready (dlm's transformer: ``Transformer.graph_ready``; a guided model is not one);
    None elsewhere: the sampler's plain calls."""
    if x.device.type == "cuda" and getattr(model, "graph_ready", False):
        return GraphedTrunk(model, x, t, pad, graph=True)
    return None
