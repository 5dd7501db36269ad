"""A pretrained Hugging Face causal LM as a dlm backbone (``dlm train --init-from hf:FOLDER``,
``--init-from smollm2-135m``): any architecture ``AutoModelForCausalLM`` loads (Llama, Qwen2,
GPT-2, SmolLM…), its tokenizer becoming the run's.

* **As it is** (``causal``, the ``ar`` family): the model's own causal attention and logits —
  a run with no training step evaluates to exactly transformers' NLL. The autoregressive
  sampler's KV cache holds the model's ``past_key_values``.
* **Adapted to diffusion** (bidirectional families, ``mdlm`` / ``usdm``): AR-to-diffusion
  adaptation as in Dream / DiffuLLaMA — full (bidirectional) attention through a 4-D mask;
  the absorbing [MASK] state added to the vocabulary (the input embedding grown by one row,
  initialised at the mean of the others); and *shifted logits* (Dream): the prediction for
  position i is read where the AR model predicts token i, at position i − 1 (position 0
  reads its own). Time conditioning is off: the pretrained model has none.

The run config records the folder (``model.pretrained: hf:FOLDER``), and the run folder keeps
a copy of the model's architecture (``RUN/pretrained``: its config.json and tokenizer files, no
weights; :func:`save_architecture`): ``dlm eval``, ``dlm sample`` and ``--resume`` rebuild the
architecture from that copy and load the run's own weights on top, so the run no longer needs
FOLDER. (A run folder without the copy, written before it existed, rebuilds from FOLDER.)
"""

from __future__ import annotations

import copy
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from dlm.backbones.base import BACKBONES, Backbone
from dlm.errors import DlmError
from dlm.fsio import make_temp_dir, writing

PREFIX = "hf:"
ARCHITECTURE = "pretrained"  # RUN/pretrained: the model's config.json and tokenizer files, no weights
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class PretrainedShape:
    """What callers read from ``model.cfg`` (the AR sampler's cache size, the FLOPs count)."""

    n_layer: int
    d_model: int
    vocab_in: int
    vocab_out: int
    causal: bool


def pretrained_folder(spec: str) -> Path:
    """The local folder of ``hf:FOLDER``, checked: a folder with a config.json."""
    if not spec.startswith(PREFIX):
        raise DlmError(f"model.pretrained must be hf:FOLDER (a local Hugging Face causal-LM folder), got {spec!r}")
    folder = Path(spec[len(PREFIX):]).expanduser()
    if not (folder / "config.json").is_file():
        raise DlmError(f"{folder} is not a Hugging Face model folder (no config.json)")
    return folder


def _transformers():
    try:
        import transformers
        from transformers.utils import logging
    except ImportError:
        raise DlmError("a pretrained backbone needs transformers: pip install 'dlm[judge]'") from None
    logging.disable_progress_bar()  # "Loading weights" on every run, eval and sample
    return transformers


def check_causal_lm(folder: Path):
    """The config of ``folder``'s model, if ``AutoModelForCausalLM`` can build it (one line if not)."""
    transformers = _transformers()
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (ValueError, OSError, KeyError) as e:
        raise DlmError(f"transformers cannot read {folder / 'config.json'}: {str(e).strip().splitlines()[0][:160]}") from None
    if type(config) is transformers.PretrainedConfig:  # a model_type transformers does not know
        raise DlmError(f"transformers does not know the architecture of {folder} "
                       f"(model_type {getattr(config, 'model_type', None) or '?'!r}): it cannot load it")
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise DlmError(f"{folder} is not a causal LM transformers can load (a {type(config).__name__}; "
                       f"AutoModelForCausalLM takes Llama, Qwen2, GPT-2, … models)")
    return config


def load_causal_lm(folder: Path):
    """``AutoModelForCausalLM`` of ``folder`` in float32, offline; one line when transformers
    cannot load it as a causal LM."""
    check_causal_lm(folder)
    transformers = _transformers()
    from safetensors import SafetensorError
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # transformers' load report: dlm says what went wrong in one line
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # unreadable, or not of this architecture
        first = (str(e).strip() or type(e).__name__).splitlines()[0][:160]
        if "ignore_mismatched_sizes" in first:  # (its report, which it points to, is silenced)
            first = "the shapes of some of its tensors do not fit its config.json"
        raise DlmError(f"cannot load the weights of {folder}: {first}") from None
    finally:
        logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers would start them from random values
        raise DlmError(f"the weights of {folder} do not cover its config.json's architecture "
                       f"(missing {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''})")
    return model.eval()


def has_weights(folder: Path) -> bool:
    """Whether ``folder`` holds weights (a safetensors or PyTorch file), not only an architecture."""
    return any(p.suffix in WEIGHT_SUFFIXES for p in Path(folder).iterdir())


MEMORY_ENV = "DLM_AVAILABLE_MEMORY"  # bytes (or 512M, 8G …): the memory figure the size check uses
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
                "I8": 1, "U8": 1, "BOOL": 1}


def float32_bytes(folder: Path) -> int:
    """What the weights of ``folder`` take in float32 (dlm's dtype): the element counts of the
    safetensors headers (no tensor is read); a PyTorch file counts by its size, at 4 bytes an
    element; an architecture without weights, by its parameters built on the meta device."""
    import json
    import math
    import struct

    if not has_weights(folder):
        with torch.device("meta"):
            model = _transformers().AutoModelForCausalLM.from_config(check_causal_lm(folder))
        return 4 * sum(p.numel() for p in model.parameters())
    total = 0
    for f in Path(folder).iterdir():
        if f.suffix == ".safetensors":
            try:
                with f.open("rb") as fh:
                    header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
                assert isinstance(header, dict)
            except (OSError, ValueError, struct.error, AssertionError, MemoryError, OverflowError):
                raise DlmError(f"{f} is not a readable safetensors file (its header)") from None
            for entry in header.values():
                if isinstance(entry, dict) and "shape" in entry:
                    total += 4 * math.prod(entry["shape"])
        elif f.suffix in WEIGHT_SUFFIXES:
            total += f.stat().st_size * 4 // 2  # a 16-bit file at worst: its elements in float32
    return total


def available_memory(device: torch.device) -> tuple[int, str]:
    """(bytes free, where): ``DLM_AVAILABLE_MEMORY`` if set, else CUDA's free memory on a GPU
    (``torch.cuda.mem_get_info``) or /proc/meminfo's MemAvailable (none known: no limit)."""
    given = os.environ.get(MEMORY_ENV, "").strip()
    if given:
        number, unit = given.rstrip("KMGTkmgtBb"), given[len(given.rstrip("KMGTkmgtBb")):].upper().rstrip("B")
        try:
            value = float(number) * _UNITS[unit]
        except (ValueError, KeyError):
            raise DlmError(f"{MEMORY_ENV}={given!r} is not a number of bytes (e.g. 8G, 512M)") from None
        return int(value), MEMORY_ENV
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0]), f"free on {device}"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except OSError:
        pass
    return 1 << 62, "unknown"


def check_fits(folder: Path, device: torch.device, copies: int, what: str) -> None:
    """One line when ``copies`` float32 copies of ``folder``'s weights (1 to hold the model; with
    training: its gradients, AdamW's two moments and the EMA) exceed the memory available on
    ``device`` — before any weight is read."""
    need = float32_bytes(folder) * copies
    free, where = available_memory(device)
    if need > free:
        raise DlmError(f"{folder} is too large to {what} here: {need / 2**30:.2f} GiB ({copies} float32 "
                       f"cop{'y' if copies == 1 else 'ies'} of its weights) but {free / 2**30:.2f} GiB available "
                       f"({where})")


def build_architecture(folder: Path):
    """The architecture of ``folder``'s config.json with fresh weights (a run's checkpoint
    supplies the trained ones), in float32."""
    config = check_causal_lm(folder)
    model = _transformers().AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def save_architecture(spec: str, run_dir: Path) -> None:
    """Copy the architecture of ``spec``'s model (config.json, generation_config.json and the
    tokenizer files transformers writes) into ``run_dir/pretrained``, whole or not at all."""
    src, dst = pretrained_folder(spec), Path(run_dir) / ARCHITECTURE
    tokenizer = _transformers().AutoTokenizer.from_pretrained(src, local_files_only=True)
    tmp = make_temp_dir(Path(run_dir), f".{ARCHITECTURE}.")
    try:
        with writing(dst):
            for name in ("config.json", "generation_config.json"):
                if (src / name).is_file():
                    shutil.copyfile(src / name, tmp / name)
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def with_run_architecture(cfg, run_dir: Path):
    """``cfg`` to build a run's model with: a copy whose ``model.pretrained`` names the run's own
    copy of the architecture (``run_dir/pretrained``) where it has one; else ``cfg`` itself."""
    arch = Path(run_dir) / ARCHITECTURE
    if not cfg.model.pretrained or not (arch / "config.json").is_file():
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.model.pretrained = PREFIX + str(arch)
    return cfg


def _untie(module, state: dict, prefix: str, local_metadata) -> None:
    """State-dict hook: a tensor that shares memory with an earlier entry (tied input and output
    embeddings: GPT-2, SmolLM2) is saved as a copy — safetensors refuses shared tensors, and
    loading writes the same values into the one tied parameter twice."""
    seen = set()
    for key, value in state.items():
        local = value.to_local() if hasattr(value, "to_local") else value  # a DTensor (FSDP2): its shard
        ptr = local.untyped_storage().data_ptr() if local.numel() else None
        if ptr is not None and ptr in seen:
            state[key] = value.clone()
        seen.add(ptr)


@BACKBONES.register("pretrained")
class PretrainedCausalLM(Backbone):
    """The :class:`~dlm.backbones.base.Backbone` contract over a transformers causal LM ``hf``
    (the module docstring); ``cache`` (a :class:`dlm.backbones.transformer.KVCache`) for the
    causal one's left-to-right sampling."""

    def __init__(self, hf, vocab_in: int, vocab_out: int, causal: bool):
        super().__init__()
        self.hf = hf
        hidden = hf.get_input_embeddings().embedding_dim
        layers = getattr(hf.config, "num_hidden_layers", None) or getattr(hf.config, "n_layer", 1)
        self.cfg = PretrainedShape(layers, hidden, vocab_in, vocab_out, causal)
        self.d_model, self.vocab_in, self.vocab_out, self.causal = hidden, vocab_in, vocab_out, causal
        self.time_conditioned = False
        self.allowed: torch.Tensor | None = None  # (L, L) bool while the attention mask anneals
        self._register_state_dict_hook(_untie)

    @property
    def blocks(self) -> torch.nn.ModuleList | None:
        """The decoder layers — the model's ModuleList of ``n_layer`` modules (Llama's
        ``model.layers``, GPT-2's ``transformer.h``) — which ``train.compile`` compiles and FSDP2
        shards one at a time, as for dlm's transformer; None if there is no such list."""
        return next((m for m in self.hf.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == self.cfg.n_layer),
                    None)

    def anneal_attention(self, allowed: torch.Tensor | None) -> None:
        if self.causal:
            super().anneal_attention(allowed)  # refused: the model is causal already
        self.allowed = allowed


    @classmethod
    def build(cls, model_cfg, *, vocab_in: int, vocab_out: int, causal: bool, cond_dim: int) -> PretrainedCausalLM:
        if cond_dim:
            raise DlmError("a pretrained causal LM has no time conditioning: set time_conditioning=false")
        folder = pretrained_folder(model_cfg.pretrained)
        check_fits(folder, torch.device("cpu"), 1, "load")  # the model is built on the CPU
        hf = load_causal_lm(folder) if has_weights(folder) else build_architecture(folder)
        rows = hf.get_input_embeddings().num_embeddings
        if vocab_out > rows:
            raise DlmError(f"the tokenizer has {vocab_out} tokens but the model {model_cfg.pretrained} only {rows}")
        if vocab_in > rows:  # the absorbing state(s): new rows at the mean of the others
            hf.resize_token_embeddings(vocab_in, mean_resizing=False)
            emb = hf.get_input_embeddings().weight
            with torch.no_grad():
                emb[rows:] = emb[:rows].mean(0)
        return cls(hf, vocab_in, vocab_out, causal)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf.get_input_embeddings()(x)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _mask(self, pad: torch.Tensor | None, B: int, T: int, device) -> torch.Tensor | None:
        """Causal: transformers' 2-D mask (1 keep) or None. Bidirectional: a (B, 1, T, T) bool
        mask — every key but the padded ones (while annealing, in training: only the keys
        ``allowed``), and each query itself."""
        if self.causal:
            return None if pad is None else (~pad).long()
        keys = torch.ones(B, 1, T, T, dtype=torch.bool, device=device) if pad is None else ~pad[:, None, None, :]
        if self.training and self.allowed is not None:  # DiffuLLaMA's annealing: causal + some future keys
            keys = keys & self.allowed[:T, :T].to(device)
        if pad is None and not (self.training and self.allowed is not None):
            return keys
        return keys | torch.eye(T, dtype=torch.bool, device=device)

    def forward(self, x=None, t=None, cache=None, score_mask=None, pad=None, *, embeds=None, head_fn=None,
                score_count=None, **unused):
        """Logits (B, T, vocab_out) or at ``score_mask`` (the Backbone contract); with ``cache``
        the input continues the cached tokens (causal only)."""
        h = self.input_vectors(x, embeds)  # (B, T, C)
        B, T, _ = h.shape
        if cache is not None:
            with warnings.catch_warnings():  # transformers ≥ 5.3 calls it `cache`; ≥ 4.46 all take this name
                warnings.simplefilter("ignore", FutureWarning)
                out = self.hf(inputs_embeds=h, past_key_values=getattr(cache, "hf", None), use_cache=True)
            cache.hf, cache.length = out.past_key_values, cache.length + T
        else:
            out = self.hf(inputs_embeds=h, attention_mask=self._mask(pad, B, T, h.device), use_cache=False)
        logits = out.logits[..., : self.vocab_out]  # (B, T, V): the absorbing state is never predicted
        if not self.causal:  # Dream's shift: position i reads the AR prediction made at i − 1
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        if score_mask is not None:
            logits = logits[score_mask]  # (N, V), row-major
        if head_fn is not None:  # the logits are already computed: the "head" is the identity
            return head_fn(lambda z: z, logits)
        return logits.float()
