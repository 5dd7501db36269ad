"""``train.compile``: on CUDA by default, the compiler check before any work, and the compiled blocks."""

from __future__ import annotations

import dataclasses
import time

import torch

from dlm.errors import DlmError


def with_compile_resolved(cfg, device: torch.device):
    """``cfg`` with ``train.compile`` decided: unset, on CUDA only (the blocks, and with static
    shapes the output layer and its loss, compiled); on a CPU compiling costs more than it
    saves in a run of minutes (``benchmarks/speed/README.md``). The run folder records it so."""
    if cfg.train.compile is not None:
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile=device.type == "cuda"))


def check_compile(device: torch.device) -> float:
    """``train.compile``: make sure inductor can build kernels on ``device`` before any work
    (raises DlmError); returns the seconds it took (inductor's import and a one-kernel build).

    A C++ compiler is looked for first (inductor's CPU kernels are C++): a warm kernel cache
    would let the probe pass without one, and the model's own kernels would then fail mid-run.
    """
    t0 = time.perf_counter()
    try:
        if device.type == "cpu":
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        probe = torch.compile(lambda x: x * 2 + 1, dynamic=False)
        probe(torch.ones(4, device=device))
    except Exception as e:  # any failure to build: inductor raises many kinds
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        need = "a C++ compiler (or set CXX)" if device.type == "cpu" else "Triton and a C compiler"
        raise DlmError(f"--compile: torch.compile cannot build kernels for {device.type} on this machine "
                       f"({first.strip()}); install {need}, or train without --compile") from None
    return time.perf_counter() - t0


def compile_blocks(model: torch.nn.Module) -> None:
    """``torch.compile`` each transformer block in place (``nn.Module.compile``).

    Only the blocks: their shapes are fixed during training, while the output layer runs at
    a varying number of scored positions (``score_mask``, ``head_fn`` chunks) that would
    recompile. All blocks share one compiled graph (inductor treats the weights as inputs),
    so compile time does not grow with depth. In place, the parameter names stay plain (no
    ``_orig_mod.``): checkpoints, the EMA and the optimiser state are those of an eager run,
    and FSDP2 then shards each compiled block as torchtitan does. A model without blocks
    is compiled whole.
    """
    blocks = getattr(model, "blocks", None)
    for module in blocks if blocks is not None else (model,):
        module.compile()
