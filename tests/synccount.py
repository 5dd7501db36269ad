"""Counting host synchronisations: a TorchDispatchMode over the operations that make the
host wait for the device (on a GPU) — ``nonzero``, ``_local_scalar_dense`` (``.item()``,
``bool(t)``, ``int(t)``), boolean-mask indexing (``aten.index`` with a bool index,
``masked_select``), ``index_put`` with a bool mask, and a copy to the host
(``_to_copy(device=cpu)``, what ``dlm.device.to_host`` does). On the CPU nothing waits,
but the same operations run, so counting them here says what a GPU would do."""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


def _bool_index(indices) -> bool:
    return any(i is not None and i.dtype == torch.bool for i in indices)


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in (aten.nonzero, aten._local_scalar_dense, aten.masked_select, aten.equal):
            self.counts[packet.__name__] += 1
        elif packet in (aten.index,) and _bool_index(args[1]):
            self.counts["bool_index"] += 1
        elif packet in (aten.index_put, aten.index_put_, aten._index_put_impl_) and _bool_index(args[1]):
            self.counts["bool_index_put"] += 1
        elif packet is aten._to_copy and kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cpu":
            self.counts["to_host"] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


# -- the tiny models and calls the host-sync test measures (tests/test_host_syncs.py; the
# -- fixture of sampler outputs, tests/data/host_sync_tokens.json, was made from them)

V = 37  # data vocabulary
SAMPLERS = {  # family, sampler, its settings
    "ar": ("ar", "ancestral", {"temperature": 1.0}),
    "mdlm-ancestral": ("mdlm", "ancestral", {"steps": 12, "temperature": 1.0}),
    "mdlm-ancestral-topk": ("mdlm", "ancestral", {"steps": 12, "temperature": 0.8, "top_k": 5}),
    "mdlm-ancestral-nocache": ("mdlm", "ancestral", {"steps": 12, "temperature": 1.0, "cache": False}),
    "mdlm-ancestral-guided": ("mdlm", "ancestral", {"steps": 12, "temperature": 1.0, "guidance": 0.5}),
    "fast-dllm-none": ("mdlm", "fast-dllm", {"steps": 16, "block_length": 8, "threshold": 0.3, "cache": "none",
                                             "temperature": 1.0}),
    "fast-dllm": ("mdlm", "fast-dllm", {"steps": 16, "block_length": 8, "threshold": 0.3, "temperature": 1.0}),
    "fast-dllm-dual": ("mdlm", "fast-dllm", {"steps": 16, "block_length": 8, "threshold": 0.3, "cache": "dual",
                                             "temperature": 1.0}),
}


def tiny(family: str, sampler: str | None = None, settings: dict | None = None, **cfg):
    """(family, model) of a 2 × 32 transformer with random weights (seed 0)."""
    from dlm.config import ComponentConfig, ModelConfig, RunConfig
    from dlm.families import FAMILIES

    run = RunConfig(family=family, model=ModelConfig(n_layer=2, n_head=2, d_model=32),
                    sampler=ComponentConfig(sampler, settings or {}), **cfg)
    FAMILIES.get(family).resolve(run)
    fam = FAMILIES.get(family)(run, V, V - 1)
    torch.manual_seed(0)
    model = fam.build_model()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return fam, model


def draw(key: str, num: int, length: int = 24, prompt: int = 4, seed: int = 1, invocations: list | None = None):
    """(tokens, network calls) of sampler ``key`` on ``num`` rows, a prompt of ``prompt`` tokens;
    ``invocations``, a list, gets one entry per call of the network (whatever its rows: the
    ancestral sampler's NFE counts full-batch equivalents)."""
    family, sampler, settings = SAMPLERS[key]
    fam, model = tiny(family, sampler, settings)
    model.eval()
    if invocations is not None:
        model.register_forward_pre_hook(lambda module, args: invocations.append(1))
    prompt_ids = torch.arange(prompt) % V
    g = torch.Generator().manual_seed(seed)
    return fam.generate(model, num, length, prompt_ids, g)
