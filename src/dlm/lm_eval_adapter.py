"""EleutherAI's lm-evaluation-harness on a dlm run: ``dlm lm-eval RUN_DIR --tasks NAMES``.

:func:`lm_eval_model` wraps a loaded run in an ``lm_eval.api.model.LM`` (not registered in
lm-eval's model registry: it is handed to ``lm_eval.simple_evaluate`` as an instance), and
:func:`run_lm_eval` runs a list of tasks offline. lm-eval (``pip install 'dlm[lm-eval]'``)
is imported only here, and only when used.

**Diffusion log-likelihoods are bounds.** For ``ar`` the log-likelihood of a continuation
is exact. For ``mdlm`` and ``usdm`` it is minus the family's conditional NELBO — a Monte
Carlo estimate (``--mc-samples`` draws) of a *lower bound* on log p(continuation | context);
masked diffusion corrupts only the continuation, the context stays clean (LLaDA's
conditional estimator). A family that names its bound (``bound_info()["bound_name"]``, the
name ``dlm eval`` prints: gaussian's continuous-time VLB) is named in the header instead. Multiple-choice accuracy then compares bounds, not likelihoods:
the protocol of LLaDA (arXiv 2502.09992) and of the MDLM papers' lm-eval numbers.

Choices this adapter makes (lm-eval leaves them to each model):

* **Tokenisation at the boundary.** ``context + continuation`` is encoded as one string and
  split after as many tokens as the context alone encodes to (after moving the context's
  trailing spaces into the continuation, as lm-eval's HF model does). The model therefore
  sees exactly the tokenisation of the whole text; when a merge crosses the boundary, the
  merged token counts as context. (If that would leave no continuation token, the two parts
  are encoded separately.) Character and byte tokenizers never merge, so for them both
  ways agree.
* **Truncation.** Context and continuation together must fit the run's ``seq_len``: the
  context is cut from the left. A continuation of ``seq_len`` tokens or more keeps only its
  last ``seq_len − 1`` tokens after one context token (like lm-eval's HF model, which also
  scores only what fits) and a warning counts how many requests were cut.
* **is_greedy.** For a causal family (``ar``): the argmax of the model at every continuation
  position, given the true prefix, is the continuation's token (one teacher-forced pass).
  For a diffusion family: greedy sampling (temperature 0, as many steps as continuation
  tokens, the run's sampler) of the continuation after the clean context reproduces it
  exactly. Multiple-choice metrics do not use it; ``acc`` of LAMBADA-style tasks does.
* **Rolling log-likelihood** (perplexity tasks): the string is scored in windows of at most
  ``seq_len`` tokens. The first window scores its tokens with no context (``ar`` predicts
  the first token from BOS, as ``dlm eval`` does; a diffusion model scores it
  unconditionally); each later window scores up to ``seq_len − 1`` new tokens with the
  tokens before them as clean context, filling the window (one token of context for a full
  window, more for the last) — lm-eval's HF model's disjoint rolling windows
  (``context_len=1``), with one position of each window left for the BOS an AR model
  reads. Every token is scored exactly once.
* **generate_until.** The prompt is clean and the next ``max_gen_toks`` (default 32)
  positions are generated with the run's sampler and steps; the text is cut at the first
  end-of-text token and then at the first ``until`` string. Greedy (temperature 0) unless
  ``do_sample`` is true or a ``temperature`` is given; ``top_k``/``top_p`` are honoured,
  other keys ignored.
  The prompt is cut from the left to leave room for the generated tokens, but keeps at
  least half the window: with a short ``seq_len`` fewer than ``max_gen_toks`` tokens are
  generated rather than the prompt lost.
* **Offline.** When ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` are not set and the hub
  is not reachable, both are set before lm-eval loads anything, so a task whose data is a
  local file works and a hub task fails at once with one line instead of hanging.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from dlm.device import autocast
from dlm.errors import DlmError

LM_EVAL_REQUIREMENT = "lm-eval==0.4.13"
DEFAULT_MAX_GEN_TOKS = 32

log = logging.getLogger(__name__)


# ─── token-level choices (no lm-eval needed) ────────────────────────────────────────


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) that concatenate to the tokenisation of the whole text."""
    n_spaces = len(context) - len(context.rstrip(" "))
    if n_spaces:  # "Question: … Answer: " + "yes" → the space belongs to the continuation
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    n_ctx = len(tokenizer.encode(context)) if context else 0
    whole = [int(i) for i in tokenizer.encode(context + continuation)]
    if n_ctx >= len(whole):  # a merge swallowed the whole continuation: keep the parts apart
        return [int(i) for i in tokenizer.encode(context)], [int(i) for i in tokenizer.encode(continuation)]
    return whole[:n_ctx], whole[n_ctx:]


def truncate_pair(context: list[int], continuation: list[int], seq_len: int) -> tuple[list[int], list[int], bool]:
    """The pair cut to fit ``seq_len`` tokens: the context from the left; a continuation that
    alone fills the window keeps its last ``seq_len − 1`` tokens (True: it was cut)."""
    if len(continuation) >= seq_len:
        keep = max(1, seq_len - 1)
        whole = context + continuation  # the token before the kept part stays as context
        return whole[: len(whole) - keep][-(seq_len - keep):] if seq_len > keep else [], continuation[-keep:], True
    room = seq_len - len(continuation)
    return context[len(context) - room:] if len(context) > room else context, continuation, False


def rolling_windows(n: int, seq_len: int) -> list[tuple[int, int, int]]:
    """(start, first scored, end) of each window over ``n`` tokens: tokens[start:end] is the
    model's input, tokens[start:first scored] its clean context; every token scored once."""
    windows, pos = [], 0
    while pos < n:
        end = min(n, pos + (seq_len if pos == 0 else max(1, seq_len - 1)))
        windows.append((max(0, end - seq_len), pos, end))
        pos = end
    return windows


def cut_at_stop(text: str, until: list[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cut = len(text)
    for stop in until:
        if stop:
            i = text.find(stop)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


def generation_lengths(n_prompt: int, max_gen_toks: int, seq_len: int) -> tuple[int, int]:
    """(prompt tokens kept, tokens generated) in a window of ``seq_len``: the prompt is cut
    from the left for ``max_gen_toks`` but keeps at least half the window."""
    gen = max(1, min(max_gen_toks, seq_len))
    if n_prompt + gen > seq_len:
        gen = min(gen, max(seq_len - n_prompt, seq_len - min(n_prompt, seq_len // 2)))
    return min(n_prompt, seq_len - gen), gen


# ─── the model behind the LM interface ──────────────────────────────────────────────


class DlmScorer:
    """Log-likelihoods, greedy checks and generations of a loaded run, on token ids and text.

    ``mc_samples`` and ``batch_size`` default to the run's ``eval`` settings; one generator
    seeded with ``seed`` draws every Monte Carlo sample and every sampled token.
    """

    def __init__(self, run, mc_samples: int | None = None, batch_size: int | None = None, seed: int = 0):
        from dlm.device import generator

        self.run = run
        self.family = run.family
        self.model = run.model
        self.tokenizer = run.tokenizer
        self.device = run.device
        self.seq_len = int(run.cfg.data.seq_len)
        self.mc_samples = int(run.cfg.eval.mc_samples if mc_samples is None else mc_samples)
        self.batch_size = int(run.cfg.eval.batch_size if batch_size is None else batch_size)
        self.generator = generator(run.device, seed)
        self.truncated = 0  # continuations cut to fit the window

    # conditional log-likelihood ---------------------------------------------------

    def _batches(self, rows: list[tuple[list[int], list[int]]]):
        """Index lists of at most ``batch_size`` rows, longest first (less padding)."""
        order = sorted(range(len(rows)), key=lambda i: -(len(rows[i][0]) + len(rows[i][1])))
        for s in range(0, len(order), self.batch_size):
            yield order[s: s + self.batch_size]

    def _right_padded(self, rows):
        """x0, clean, pad (B, L) for rows (context, continuation), padded on the right."""
        L = max(len(c) + len(t) for c, t in rows)
        x0 = torch.full((len(rows), L), self.tokenizer.eos_id, dtype=torch.long)
        clean = torch.zeros((len(rows), L), dtype=torch.bool)
        pad = torch.zeros((len(rows), L), dtype=torch.bool)
        for j, (c, t) in enumerate(rows):
            n = len(c) + len(t)
            x0[j, :n] = torch.as_tensor(c + t, dtype=torch.long)
            clean[j, : len(c)] = True
            pad[j, n:] = True
        return x0.to(self.device), clean.to(self.device), pad.to(self.device)

    def nll(self, rows: list[tuple[list[int], list[int]]]) -> list[float]:
        """−log p(continuation | context) in nats per (context, continuation) row that fits
        ``seq_len``: exact for ``ar``, a Monte Carlo upper bound for diffusion families."""
        from dlm.batch import Batch

        out = [0.0] * len(rows)
        for idx in self._batches(rows):
            batch = [rows[i] for i in idx]
            x0, clean, pad = self._right_padded(batch)
            with torch.no_grad(), autocast(self.device):
                nats = self.family.nll(self.model, Batch(x0, clean, pad if pad.any() else None),
                                       self.generator, self.mc_samples)
            for i, v in zip(idx, nats.tolist()):
                out[i] = float(v)
        return out

    def greedy(self, rows: list[tuple[list[int], list[int]]]) -> list[bool]:
        """Whether greedy decoding after each context yields exactly its continuation."""
        return self._greedy_causal(rows) if self.family.causal else self._greedy_sampled(rows)

    def _greedy_causal(self, rows):
        out = [False] * len(rows)
        for idx in self._batches(rows):
            x0, clean, pad = self._right_padded([rows[i] for i in idx])
            bos = torch.full_like(x0[:, :1], self.tokenizer.eos_id)  # the AR family's input: [BOS, x0[:-1]]
            with torch.no_grad():  # causal: the padded tail never reaches the positions before it
                logits = self.model(torch.cat([bos, x0[:, :-1]], dim=1))  # (B, L, V)
            scored = ~clean & ~pad
            ok = ((logits.argmax(-1) == x0) | ~scored).all(-1)
            for i, v in zip(idx, ok.tolist()):
                out[i] = bool(v)
        return out

    def _greedy_sampled(self, rows):
        out = [False] * len(rows)
        groups = defaultdict(list)  # a batch shares one length and one step count
        for i, (c, t) in enumerate(rows):
            groups[(len(c), len(t))].append(i)
        for (n_ctx, n_cont), members in groups.items():
            settings = dataclasses.replace(self.family.sampler_settings, steps=n_cont, temperature=0.0)
            for s in range(0, len(members), self.batch_size):
                idx = members[s: s + self.batch_size]
                x0, clean, _ = self._right_padded([rows[i] for i in idx])
                with torch.no_grad(), autocast(self.device):
                    tokens, _ = self.family.sample(self.model, torch.where(clean, x0, 0), clean, self.generator, settings)
                ok = (tokens[:, n_ctx:] == x0[:, n_ctx:]).all(-1)
                for i, v in zip(idx, ok.tolist()):
                    out[i] = bool(v)
        return out

    def loglikelihood(self, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(log-likelihood, is_greedy) of each (context, continuation) string pair."""
        rows, cut = [], 0
        for context, continuation in pairs:
            c, t = encode_pair(self.tokenizer, context, continuation)
            c, t, was_cut = truncate_pair(c, t, self.seq_len)
            cut += was_cut
            rows.append((c, t))
        if cut:
            self.truncated += cut
            log.warning("dlm lm-eval: %d continuation(s) longer than the window of %d tokens were cut to "
                        "their last %d tokens", cut, self.seq_len, self.seq_len - 1)
        scored = [i for i, (_, t) in enumerate(rows) if t]  # an empty continuation has log-likelihood 0
        nll = self.nll([rows[i] for i in scored])
        greedy = self.greedy([rows[i] for i in scored])
        out = [(0.0, True)] * len(rows)
        for k, i in enumerate(scored):
            out[i] = (-nll[k], greedy[k])
        return out

    def loglikelihood_rolling(self, texts: list[str]) -> list[float]:
        """Log-likelihood of each whole string, in rolling windows of ``seq_len`` tokens."""
        rows, owner = [], []
        for r, text in enumerate(texts):
            ids = [int(i) for i in self.tokenizer.encode(text)]
            for start, first, end in rolling_windows(len(ids), self.seq_len):
                rows.append((ids[start:first], ids[first:end]))
                owner.append(r)
        out = [0.0] * len(texts)
        for r, v in zip(owner, self.nll(rows)):
            out[r] -= v
        return out

    # generation --------------------------------------------------------------------

    def _gen_settings(self, kwargs: dict[str, Any]):
        do_sample = kwargs.get("do_sample")
        temperature = kwargs.get("temperature")
        if do_sample is False:
            temperature = 0.0
        elif temperature is None:
            temperature = self.family.sampler_settings.temperature if do_sample else 0.0
        asked = {"temperature": float(temperature)}
        for key in ("top_k", "top_p"):
            if kwargs.get(key) is not None:
                asked[key] = type(getattr(self.family.sampler_settings, key))(kwargs[key])
        settings = dataclasses.replace(self.family.sampler_settings, **asked)
        settings.check()
        return settings

    def generate_until(self, requests: list[tuple[str, dict[str, Any]]]) -> list[str]:
        """The text generated after each prompt, cut at end-of-text and at the ``until`` strings."""
        prepared, groups, all_settings = [], defaultdict(list), {}
        for r, (context, kwargs) in enumerate(requests):
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            if max_gen < 1:
                raise DlmError(f"max_gen_toks must be ≥ 1, got {max_gen}")
            ids = [int(i) for i in self.tokenizer.encode(context)] if context else []
            n_prompt, gen = generation_lengths(len(ids), max_gen, self.seq_len)
            prompt = ids[len(ids) - n_prompt:] if n_prompt else []
            settings = self._gen_settings(kwargs)
            key = (len(prompt), gen, tuple(sorted(dataclasses.asdict(settings).items())))
            prepared.append((prompt, until))
            groups[key].append(r)
            all_settings[key] = settings
        texts = [""] * len(requests)
        for key, members in groups.items():
            n_prompt, gen, _ = key
            settings = all_settings[key]
            for s in range(0, len(members), self.batch_size):
                idx = members[s: s + self.batch_size]
                given = torch.zeros((len(idx), n_prompt + gen), dtype=torch.long)
                clean = torch.zeros_like(given, dtype=torch.bool)
                for j, r in enumerate(idx):
                    given[j, :n_prompt] = torch.as_tensor(prepared[r][0], dtype=torch.long)
                    clean[j, :n_prompt] = True
                with torch.no_grad(), autocast(self.device):
                    tokens, _ = self.family.sample(self.model, given.to(self.device), clean.to(self.device),
                                                   self.generator, settings)
                for j, r in enumerate(idx):
                    generated = tokens[j, n_prompt:].tolist()
                    if self.tokenizer.eos_id in generated:
                        generated = generated[: generated.index(self.tokenizer.eos_id)]
                    texts[r] = cut_at_stop(self.tokenizer.decode(generated), prepared[r][1])
        return texts


# ─── lm-eval glue ───────────────────────────────────────────────────────────────────


def import_lm_eval():
    """The ``lm_eval`` package, or one line saying how to install it."""
    try:
        import lm_eval
        import lm_eval.api.model  # noqa: F401
    except ImportError:
        raise DlmError(f"dlm lm-eval needs EleutherAI's lm-evaluation-harness ({LM_EVAL_REQUIREMENT}): "
                       f"pip install 'dlm[lm-eval]'") from None
    return lm_eval


_LM_CLASS = None


def _lm_class():
    """``DlmLM``: :class:`DlmScorer` behind lm-eval's ``LM`` interface (built on first use,
    so that importing this module does not import lm-eval)."""
    global _LM_CLASS
    if _LM_CLASS is None:
        from lm_eval.api.model import LM

        class DlmLM(LM):
            def __init__(self, run, mc_samples=None, batch_size=None, seed=0):
                super().__init__()
                self.scorer = DlmScorer(run, mc_samples, batch_size, seed)
                self.run = run

            def loglikelihood(self, requests, disable_tqdm: bool = False):
                pairs = [tuple(r.args) for r in requests]
                out = self.scorer.loglikelihood(pairs)
                for pair, res in zip(pairs, out):
                    self.cache_hook.add_partial("loglikelihood", pair, res)
                return out

            def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
                texts = [r.args[0] for r in requests]
                out = self.scorer.loglikelihood_rolling(texts)
                for text, res in zip(texts, out):
                    self.cache_hook.add_partial("loglikelihood_rolling", (text,), res)
                return out

            def generate_until(self, requests, disable_tqdm: bool = False):
                args = [(r.args[0], r.args[1]) for r in requests]
                out = self.scorer.generate_until(args)
                for a, res in zip(args, out):
                    self.cache_hook.add_partial("generate_until", a, res)
                return out

            def get_model_info(self) -> dict:
                s, family = self.scorer, self.run.family
                name = family.bound_info().get("bound_name") if family.is_bound else None  # the family's own bound
                kind = "exact" if not family.is_bound else f"lower bound (minus the {name})" if name else \
                    "lower bound (-NELBO)"
                return {"dlm_run": str(self.run.path), "dlm_step": self.run.step, "dlm_family": self.run.cfg.family,
                        "loglikelihood": kind, "bound_name": name,
                        "mc_samples": s.mc_samples, "seq_len": s.seq_len, "truncated_continuations": s.truncated}

        _LM_CLASS = DlmLM
    return _LM_CLASS


def lm_eval_model(run, mc_samples: int | None = None, batch_size: int | None = None, seed: int = 0):
    """An ``lm_eval.api.model.LM`` for a loaded run (see the module docstring)."""
    import_lm_eval()
    return _lm_class()(run, mc_samples, batch_size, seed)


def go_offline_if_unreachable() -> bool:
    """Set HF_HUB_OFFLINE / HF_DATASETS_OFFLINE when asked or when the hub is unreachable, so
    that nothing waits on the network; True when offline."""
    from dlm.data.corpora import hub_reachable

    offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
    if not offline and not hub_reachable():
        offline = True
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        # modules imported before this point read the variables once, at import
        for module, attrs in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                              ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))):
            mod = sys.modules.get(module)
            for attr in attrs:
                if mod is not None and hasattr(mod, attr):
                    setattr(mod, attr, True)
    return offline


def _builtin_yaml_texts() -> list[tuple[Path, bytes]]:
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    out = []
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".yaml"):
                path = Path(folder) / name
                try:
                    out.append((path, path.read_bytes()))
                except OSError:
                    continue
    return out


def _yaml_problem(e: Exception) -> str:
    """One line for what lm-eval's YAML loader raised: the line and the problem of a YAML error."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is not None and problem:
        return f"line {mark.line + 1}: {problem}"
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def _unreadable_yaml(name: str, include_path: str) -> tuple[Path, str] | None:
    """The first task YAML under ``include_path`` that lm-eval's loader refuses (the task index
    skips such a file without a word), one that mentions ``name`` first; None if all load."""
    from lm_eval.tasks._yaml_loader import load_yaml

    root = Path(include_path)
    files = sorted(root.rglob("*.yaml")) if root.is_dir() else [root]
    bad = []
    for path in files:
        try:
            load_yaml(path, resolve_func=False)
        except Exception as e:  # yaml.YAMLError, a missing include, not a mapping: all skipped by lm-eval
            mentions = name.encode() in path.read_bytes() if path.is_file() else False
            bad.append((not mentions, str(path), _yaml_problem(e)))
    if not bad:
        return None
    _, path, problem = min(bad)
    return Path(path), problem


def _unknown(name: str, include_path: str | None) -> DlmError:
    where = f"lm-eval's built-in tasks or {include_path}" if include_path else "lm-eval's built-in tasks"
    hint = "" if include_path else "; a local task's YAML folder goes in --include-path DIR"
    if include_path and (bad := _unreadable_yaml(name, include_path)):
        hint = f"; lm-eval skipped {bad[0]}, which it cannot read ({bad[1]})"
    return DlmError(f"unknown lm-eval task '{name}': not among {where}{hint}")


def task_manager(names: list[str], include_path: str | None):
    """A TaskManager that knows every name in ``names``, built as cheaply as possible, or one
    line naming the first unknown task.

    Indexing lm-eval's ~14,000 built-in YAML files takes 15–25 s on a small machine, so
    this tries, in order: the include folder alone; the built-in folders whose YAML files
    define the names (``task: NAME``); and only then the whole index. A name found in no
    built-in YAML file at all is unknown at once.
    """
    from lm_eval.tasks import TaskManager

    found_local: set[str] = set()
    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(n in local.all_tasks for n in names):
            return local
        found_local = set(local.all_tasks)
    missing = [n for n in names if n not in found_local]
    texts = _builtin_yaml_texts()
    for n in missing:
        if not any(n.encode() in text for _, text in texts):
            raise _unknown(n, include_path)
    folders = []
    for n in missing:
        line = re.compile(rb"^task:\s*['\"]?" + re.escape(n.encode()) + rb"['\"]?\s*$", re.M)
        defining = [path for path, text in texts if n.encode() in text and line.search(text)]
        if len(defining) != 1:
            folders = None  # a group, a tag or a name defined twice: only the full index decides
            break
        folders.append(defining[0].parent)
    if folders is not None:
        paths = [str(f) for f in dict.fromkeys(folders)] + ([include_path] if include_path else [])
        narrow = TaskManager(include_path=paths, include_defaults=False)
        if all(n in narrow.all_tasks and narrow.task_index[n].kind.name in ("TASK", "PY_TASK") for n in missing):
            return narrow
    full = TaskManager(include_path=include_path)
    for n in names:
        if n not in full.all_tasks:
            raise _unknown(n, include_path)
    return full


def _check_fields(manager, name: str) -> None:
    """One line naming a field lm-eval needs that the YAML of task ``name`` lacks, before any
    loading: ``doc_to_text`` and ``doc_to_target`` (every YAML task reads them at once; lm-eval
    stops with a bare TypeError after reading the dataset) and ``doc_to_choice`` of a
    multiple-choice task (without it the evaluation fails with a traceback). A promptsource
    ``use_prompt`` or a Python task class gives them its own way."""
    entry = getattr(manager, "task_index", {}).get(name)
    cfg = getattr(entry, "cfg", None)
    if not isinstance(cfg, dict) or cfg.get("use_prompt") or "class" in cfg or entry.kind.name != "TASK":
        return
    need = ["doc_to_text", "doc_to_target"] + (["doc_to_choice"] if cfg.get("output_type") == "multiple_choice" else [])
    missing = [f for f in need if cfg.get(f) is None]
    if missing:
        raise DlmError(f"lm-eval task '{name}': its YAML {entry.yaml_path} has no {' and no '.join(missing)} "
                       f"(lm-eval needs {', '.join(need)})")


def load_tasks(manager, names: list[str], offline: bool) -> list:
    """The Task / Group objects for ``names`` (their data loaded), or one line saying why not."""
    objs = []
    for name in names:
        _check_fields(manager, name)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # lm-eval prints debugging lines (`<class 'NoneType'>`)
                loaded = manager.load([name])
        except Exception as e:  # datasets and lm-eval raise many types; all mean "cannot load it here"
            first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
            if offline and not isinstance(e, FileNotFoundError):
                raise DlmError(f"lm-eval task '{name}': its dataset is not available offline (the Hugging Face hub "
                               f"is not reachable and it is not in the local cache): {first}") from None
            raise DlmError(f"cannot load lm-eval task '{name}': {first}") from None
        if name in loaded["groups"]:
            objs.append(loaded["groups"][name])
        else:
            objs.extend(loaded["tasks"].values())
    return objs


def check_values(limit: int | None, mc_samples: int | None, batch_size: int | None) -> None:
    for flag, value in (("--limit", limit), ("--mc-samples", mc_samples), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise DlmError(f"{flag} must be ≥ 1, got {value}")


def run_lm_eval(run_dir, tasks: str, include_path: str | None = None, limit: int | None = None,
                mc_samples: int | None = None, batch_size: int | None = None, seed: int = 0,
                device: str = "auto") -> dict:
    """lm-eval's result dict (``results``, ``n-samples``, ``configs``, …) for ``tasks``
    (comma-separated names) on the run in ``run_dir``."""
    from dlm.runs import load_run

    check_values(limit, mc_samples, batch_size)
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise DlmError("--tasks names no task")
    if include_path is not None and not Path(include_path).is_dir():
        raise DlmError(f"--include-path {include_path} is not a folder")
    offline = go_offline_if_unreachable()  # before lm-eval imports datasets
    lm_eval = import_lm_eval()
    import lm_eval.evaluator

    manager = task_manager(names, include_path)
    run = load_run(Path(run_dir), device)
    objs = load_tasks(manager, names, offline)
    model = lm_eval_model(run, mc_samples, batch_size, seed)
    results = lm_eval.evaluator.simple_evaluate(model=model, tasks=objs, task_manager=manager, limit=limit,
                                                log_samples=False, batch_size=model.scorer.batch_size,
                                                device=str(run.device))
    if results is None:  # not rank 0
        return {}
    return results


def format_results(results: dict) -> str:
    """lm-eval's tables, after a line saying what the log-likelihoods are."""
    from lm_eval.utils import make_table

    info = results.get("config", {})
    bound = f"minus the {info['bound_name']}" if info.get("bound_name") else "−NELBO"  # the family's own bound
    head = (f"{info.get('dlm_family')} run {info.get('dlm_run')} at step {info.get('dlm_step')}: log-likelihoods "
            + ("are lower bounds (%s, %s Monte Carlo samples)" % (bound, info.get("mc_samples"))
               if info.get("loglikelihood") != "exact" else "are exact"))
    out = [head, make_table(results)]
    if results.get("groups"):
        out.append(make_table(results, "groups"))
    return "\n".join(out)


def results_json(results: dict) -> str:
    import json

    from lm_eval.utils import handle_non_serializable

    return json.dumps(results, default=handle_non_serializable)
