"""Left-to-right sampling of the causal baseline with a KV cache: one network call per token."""

from __future__ import annotations

import torch

from dlm.backbones import KVCache
from dlm.device import to_host
from dlm.errors import DlmError
from dlm.processes.causal import Causal
from dlm.samplers.base import UNSET, Sampler, filter_logits, sample_categorical


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
            rows = torch.tensor([b for b, m in enumerate(host) if m == n], device=given.device)

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
        cache = KVCache(model.cfg.n_layer, max_len=length)  # preallocated: written in place
        logits = model(prefix, cache=cache)[:, -1]  # prefill: (B, V)
        nfe = 1
        while out.shape[1] < length:
            nxt = sample_categorical(filter_logits(logits, self.options), generator)[:, None]  # (B, 1)
            out = torch.cat([out, nxt], dim=1)
            grown(out)
            if out.shape[1] < length:
                logits = model(nxt, cache=cache)[:, -1]
                nfe += 1
        return out, nfe
