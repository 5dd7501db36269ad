"""Drawing from a loaded run (``dlm.runs.LoadedRun``): its sampler settings, unconditional or
prompted samples, infilled templates, and the texts ``dlm sample`` prints.

Timing: every draw is timed on the host around the sampler call, after the device has
finished (``torch.cuda.synchronize``), so the seconds are the sampling's and nothing else's.
"""

from __future__ import annotations

import time

import torch

from dlm.data.tokenizers import check_text
from dlm.device import autocast, generator
from dlm.errors import DlmError
from dlm.infill import parse_template
from dlm.samplers.base import recording
from dlm.service.training import answer_width
from dlm.trace import check_trace_path, save_trace


def sampler_settings(run, steps: int | None = None, temperature: float | None = None,
                     top_k: int | None = None, top_p: float | None = None, name: str | None = None,
                     overrides: list[str] | tuple = ()):
    """Choose the run's sampler (or the family's sampler ``name``) with the run's ``sampler``
    settings, then ``sampler.KEY=VALUE`` ``overrides`` and the keyword values that are not None
    on top, checked in one place; returns the chosen sampler's settings.

    A sampler other than the run's starts from its own defaults and keeps, of the run's, only
    the settings every sampler of the process shares (``Family.sampler_section``).
    """
    from dlm.config import parse_override

    changes = {}
    for text in overrides:
        key, value = parse_override(text)
        if not key.startswith("sampler.") or key == "sampler.name":
            raise DlmError(f"only sampler settings can be given here (sampler.KEY=VALUE), got '{key}'")
        changes[key[len("sampler."):]] = value
    given = {"steps": steps, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    changes.update({k: v for k, v in given.items() if v is not None})
    return run.family.choose_sampler(run.family.sampler_section(name, changes))


def _synchronize(run) -> None:
    if run.device.type == "cuda":
        torch.cuda.synchronize()


def generate(run, num: int, length: int, prompt_ids=None, settings=None, seed: int = 0,
             batch: int | None = None) -> tuple[torch.Tensor, int, float]:
    """``num`` samples of ``length`` tokens (each starting with ``prompt_ids``, kept fixed, when
    given), drawn ``batch`` at a time (default: all at once) from one generator seeded ``seed``.

    Returns (tokens (num, length) on the CPU, network calls per batch, sampling seconds).
    """
    gen = generator(run.device, seed)
    batch = batch or num
    rows, nfe, seconds = [], 0, 0.0
    for start in range(0, num, batch):
        t0 = time.perf_counter()
        with torch.no_grad(), autocast(run.device):  # bf16 on CUDA, as training and eval run
            tokens, nfe = run.family.generate(run.model, min(batch, num - start), length, prompt_ids, gen, settings)
        _synchronize(run)
        seconds += time.perf_counter() - t0
        rows.append(tokens.cpu())
    return torch.cat(rows), nfe, seconds


def sample_given(run, given: torch.Tensor, clean: torch.Tensor, settings=None,
                 seed: int = 0) -> tuple[torch.Tensor, int, float]:
    """Fill the positions of ``given`` (B, L) that ``clean`` (B, L) bool leaves open, keeping
    the clean ones; one generator seeded ``seed``.

    Returns (tokens (B, L) on the run's device, network calls, sampling seconds).
    """
    t0 = time.perf_counter()
    with torch.no_grad(), autocast(run.device):
        tokens, nfe = run.family.sample(run.model, given, clean, generator(run.device, seed), settings)
    _synchronize(run)
    return tokens, nfe, time.perf_counter() - t0


def answer_text(tokenizer, prompt: str, row, n_prompt: int) -> str:
    """The prompt as typed, then the generated tokens of ``row`` after the first ``n_prompt``,
    up to the first end-of-text."""
    generated = [int(i) for i in row[n_prompt:]]
    if tokenizer.eos_id in generated:
        generated = generated[: generated.index(tokenizer.eos_id)]
    return prompt + tokenizer.decode(generated)


def infill(run, template: str, num: int, settings=None, seed: int = 0) -> tuple[list[str], int, float, int]:
    """``num`` samples of ``template`` with every ``[MASK*N]`` hole filled (text outside kept
    byte for byte; see ``dlm.infill``).

    Returns (texts, network calls, sampling seconds, tokens in the template).
    """
    tmpl = parse_template(template, run.tokenizer, run.cfg.data.seq_len)
    given = torch.as_tensor(tmpl.ids, dtype=torch.long, device=run.device)[None].expand(num, -1).clone()
    clean = torch.as_tensor(tmpl.clean, dtype=torch.bool, device=run.device)[None].expand(num, -1).clone()
    tokens, nfe, seconds = sample_given(run, given, clean, settings, seed)
    return [tmpl.fill(run.tokenizer, row.tolist()) for row in tokens.cpu()], nfe, seconds, len(tmpl.ids)


def sample_run(run, num: int = 4, steps: int | None = None, length: int | None = None, prompt: str | None = None,
               temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
               seed: int = 0, infill: str | None = None, sampler: str | None = None,
               overrides: list[str] | tuple = (), trace=None) -> dict:
    """``dlm sample``: ``num`` texts from ``run``, unconditional, after ``prompt`` (each answer
    stops at end-of-text) or filling the ``infill`` template; sampler chosen as by
    :func:`sampler_settings`; ``trace``: a file (.html, .gif) to draw the trajectory in (``dlm.trace``).

    Returns ``{"samples": [text…], "seconds", "tokens_per_s", "nfe", "steps", "length", "family", "step"}``.
    """
    cfg = run.cfg
    if num < 1:
        raise DlmError(f"--num must be ≥ 1, got {num}")
    if length is not None and not 1 <= length <= cfg.data.seq_len:
        raise DlmError(f"--length must be in [1, {cfg.data.seq_len}] (the sequence length this model was trained on), got {length}")
    settings = sampler_settings(run, steps, temperature, top_k, top_p, sampler, overrides)
    for flag, text in (("--prompt", prompt), ("--infill", infill)):
        if text is not None:
            check_text(text, flag, from_argv=True)
    if trace is not None:
        check_trace_path(trace)
    with recording() as frames:
        if infill is not None:
            if prompt is not None or length is not None:
                raise DlmError("--infill gives the whole sequence: drop --prompt and --length")
            texts, nfe, seconds, length = _infill(run, infill, num, settings, seed)
        else:
            if length is None:  # answers of a data.sft_length=batch run: in rows as long as its longest training row
                length = answer_width(run, len(run.tokenizer.encode(prompt))) if prompt else cfg.data.seq_len
            texts, nfe, seconds = _continue(run, num, length, prompt, settings, seed)
    if trace is not None:
        save_trace(trace, frames, run.tokenizer, prompt, infill, cfg.data.seq_len,
                   f"dlm sample {run.path.name}: {cfg.family}, {run.family.sampler_cls.name}, seed {seed}")
    return {
        "samples": texts,
        "seconds": seconds,
        "tokens_per_s": num * length / seconds,
        "nfe": nfe,
        "steps": run.family.network_steps(settings, length),
        "length": length,
        "family": cfg.family,
        "step": run.step,
    }


_infill = infill  # sample_run's parameter ``infill`` (the template) shadows the function


def _continue(run, num: int, length: int, prompt: str | None, settings, seed: int) -> tuple[list[str], int, float]:
    """Unconditional texts, or answers to ``prompt``: (texts, network calls, seconds)."""
    prompt_ids = None
    if prompt:
        prompt_ids = torch.as_tensor(run.tokenizer.encode(prompt), dtype=torch.long)
        if len(prompt_ids) >= length:
            raise DlmError(f"the prompt is {len(prompt_ids)} tokens, it must be shorter than --length {length}")
    tokens, nfe, seconds = generate(run, num, length, prompt_ids, settings, seed)
    if prompt_ids is None:
        return [run.tokenizer.decode(row.tolist()) for row in tokens], nfe, seconds
    # an answer to the prompt: it stops at end-of-text
    return [answer_text(run.tokenizer, prompt, row, len(prompt_ids)) for row in tokens], nfe, seconds
