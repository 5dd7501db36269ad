"""Left-to-right sampling of the causal baseline with a KV cache: one network call per token.

The decoding step runs through a *decoder* (:meth:`AutoregressiveSampler.decoder`): on the
CPU the preallocated KV cache (:class:`CachedDecoder`); on CUDA, for the dlm transformer, a
CUDA graph of the step (:class:`GraphReadyDecoder`): a static cache attended over whole,
the next position a device tensor the step advances itself, the input token a fixed buffer
— every step the same kernels on the same memory, replayed as one launch instead of a few
hundred. The graph-ready step run eagerly gives the cached decoder's tokens (float32
rounding apart: ``tests/test_host_syncs.py``).
"""

from __future__ import annotations

import torch

from dlm.backbones import KVCache
from dlm.device import to_host, true_positions
from dlm.errors import DlmError
from dlm.processes.causal import Causal
from dlm.samplers.base import UNSET, Sampler, filter_logits, sample_categorical
from dlm.samplers.graphs import WARMUP, capture, on_side_stream


def prefix_lengths(clean: torch.Tensor) -> torch.Tensor:
    """(B,) length of each row's clean prefix; a clean token after a generated one is an error:
    a causal model conditions on a left context only, it cannot fill a hole."""
    n = clean.sum(-1)
    prefix = torch.arange(clean.shape[1], device=clean.device)[None] < n[:, None]
    if not torch.equal(prefix, clean):
        raise DlmError("the autoregressive family conditions on a left context only: it cannot keep "
                       "tokens after the ones it generates (infilling needs a diffusion family)")
    return n


class AutoregressiveSampler(Sampler):
    name = "ancestral"

    @torch.no_grad()
    def sample(self, model, process: Causal, given, clean, generator, time_conditioned=False, pad=None):
        """(B, L) tokens, each row's clean prefix kept, and the network calls of the longest
        group. Rows are generated in groups of equal prefix length (a KV cache needs them aligned)."""
        bos_id = process.bos_id
        lengths = prefix_lengths(clean)
        out = given.clone()
        state = torch.where(clean, given, UNSET)  # the trace's view: positions not generated yet are UNSET
        self.record(state)
        nfe = 0
        host = to_host(lengths)  # one host synchronisation; the groups' rows are indexed from the host
        for n in sorted(set(host)):
            rows = true_positions(lengths == n, host.count(n))  # on the device (a copy from the host would wait)

            def grown(part, rows=rows):  # one more token in these rows: the whole state, recorded
                state[rows, : part.shape[1]] = part
                self.record(state)

            out[rows], calls = self._sample_rows(model, bos_id, given[rows, :n], given.shape[1], generator, grown)
            nfe = max(nfe, calls)
        return out, nfe

    def _sample_rows(self, model, bos_id: int, prompt, length: int, generator, grown):
        num = prompt.shape[0]
        prefix = torch.cat([torch.full((num, 1), bos_id, dtype=torch.long, device=prompt.device), prompt], dim=1)
        out = prefix[:, 1:]
        if out.shape[1] >= length:
            return out[:, :length], 0
        decode = self.decoder(model, num, length, prompt.device)
        logits = decode.prefill(prefix)  # (B, V)
        nfe = 1
        while out.shape[1] < length:
            nxt = sample_categorical(filter_logits(logits, self.options), generator)[:, None]  # (B, 1)
            out = torch.cat([out, nxt], dim=1)
            grown(out)
            if out.shape[1] < length:
                logits = decode(nxt)
                nfe += 1
        return out, nfe

    def decoder(self, model, num: int, length: int, device: torch.device):
        """The decoding steps of ``num`` rows of ``length`` positions: a CUDA graph on CUDA for
        the dlm transformer (positions on the device), the preallocated cache elsewhere."""
        if device.type == "cuda" and getattr(model, "graph_ready", False):
            return GraphReadyDecoder(model, num, length, device, graph=True)
        return CachedDecoder(model, length)


class CachedDecoder:
    """``prefill(prefix)`` then ``__call__(token)``: the last position's logits (B, V), with a
    KV cache preallocated for ``length`` positions (written in place)."""

    def __init__(self, model, length: int):
        self.model = model
        self.cache = KVCache(model.cfg.n_layer, max_len=length)

    def prefill(self, prefix: torch.Tensor) -> torch.Tensor:
        return self.model(prefix, cache=self.cache)[:, -1]

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        return self.model(token, cache=self.cache)[:, -1]


class GraphReadyDecoder(CachedDecoder):
    """The decoding step with fixed shapes: a static cache whose position is a device tensor
    (:meth:`KVCache.graph_ready`), the token copied into a fixed (B, 1) buffer. With
    ``graph`` (CUDA) the step is captured once, after ``WARMUP`` eager steps on a side
    stream, in a ``torch.cuda.CUDAGraph`` and replayed from then on; without, the same step
    runs eagerly (what the CPU tests compare with :class:`CachedDecoder`)."""

    def __init__(self, model, num: int, length: int, device: torch.device, graph: bool):
        self.model = model
        self.cache = KVCache.graph_ready(model.cfg.n_layer, length, device)
        self.token = torch.zeros((num, 1), dtype=torch.long, device=device)
        self.graph, self.steps, self.logits = graph, 0, None

    def step(self) -> torch.Tensor:
        """The step a graph captures: the logits (B, V) after the token in ``self.token``."""
        return self.model(self.token, cache=self.cache)[:, -1]

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        self.token.copy_(token)
        self.steps += 1
        if not self.graph:
            return self.step()
        if self.steps <= WARMUP:  # real steps: each writes the cache and advances the position
            return on_side_stream(self.step)
        if not isinstance(self.graph, torch.cuda.CUDAGraph):
            length = self.cache.length
            self.graph, self.logits = capture(self.step)  # runs the Python, not the kernels:
            self.cache.length = length  # the host's count back
        self.graph.replay()  # the position advances inside the graph; the host keeps count
        self.cache.length += 1
        return self.logits
