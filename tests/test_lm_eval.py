"""``dlm lm-eval``: the real lm-evaluation-harness (offline, on the shipped local task) over
tiny ar and mdlm runs trained here, the adapter's numbers against direct computations, and
one clear line for every kind of bad input."""

import json
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from dlm.cli import main  # noqa: E402
from dlm.lm_eval_adapter import (  # noqa: E402
    cut_at_stop,
    encode_pair,
    generation_lengths,
    lm_eval_model,
    rolling_windows,
    truncate_pair,
)
from dlm.runs import load_run  # noqa: E402
from helpers import TINY, one_line_error, run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASK_DIR = REPO / "tests" / "data" / "lm_eval_task"
TASK = "dlm_tiny_mc"
N_DOCS = sum(1 for line in (TASK_DIR / f"{TASK}.jsonl").read_text().splitlines() if line.strip())
LINES = [
    "To be, or not to be, that is the question.",
    "All the world's a stage, and all the men and women merely players.",
    "Now is the winter of our discontent.",
    "A horse! a horse! my kingdom for a horse!",
    "Friends, Romans, countrymen, lend me your ears.",
    "The course of true love never did run smooth.",
    "If music be the food of love, play on.",
    "What's in a name? That which we call a rose.",
]


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # the task's data_files path is relative to the repository root


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny ar and mdlm runs (char tokenizer, seq_len 32) trained on the task's lines."""
    d = tmp_path_factory.mktemp("lm-eval")
    corpus = d / "lines.txt"
    corpus.write_text("".join(line + "\n" for _ in range(60) for line in LINES))
    out = {}
    for family in ("ar", "mdlm"):
        out[family] = d / family
        assert main(["train", "--family", family, "--data", str(corpus), "--out", str(out[family]), "--steps", "20", *TINY]) == 0
    return out


def _lm(path, **kw):
    return lm_eval_model(load_run(path, "cpu"), **kw)


def _req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


# ─── end to end through lm-eval ─────────────────────────────────────────────────────


@pytest.mark.parametrize("family", ["ar", "mdlm"])
def test_lm_eval_end_to_end_json(family, runs, capsys):
    code, out, err = run(["lm-eval", str(runs[family]), "--tasks", TASK, "--include-path", str(TASK_DIR),
                          "--mc-samples", "2", "--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    acc = r["results"][TASK]["acc,none"]
    assert 0.0 <= acc <= 1.0
    assert r["n-samples"][TASK] == {"original": N_DOCS, "effective": N_DOCS}
    assert r["config"]["dlm_family"] == family
    assert r["config"]["loglikelihood"] == ("exact" if family == "ar" else "lower bound (-NELBO)")


def test_lm_eval_table_and_limit(runs, capsys):
    code, out, err = run(["lm-eval", str(runs["ar"]), "--tasks", TASK, "--include-path", str(TASK_DIR),
                          "--limit", "3", "--batch-size", "2"], capsys)
    assert code == 0, err
    assert out.startswith(f"ar run {runs['ar']} at step 20: log-likelihoods are exact")
    assert TASK in out and "acc" in out and "|" in out
    code, out, err = run(["lm-eval", str(runs["ar"]), "--tasks", TASK, "--include-path", str(TASK_DIR),
                          "--limit", "3", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["n-samples"][TASK]["effective"] == 3


# ─── the adapter's numbers ──────────────────────────────────────────────────────────


def _direct_ar_loglikelihood(run_, context: str, continuation: str) -> tuple[float, bool]:
    """Σ log-softmax over the continuation with the model itself: input [BOS, x0[:-1]]."""
    tok = run_.tokenizer
    ids = torch.as_tensor(tok.encode(context + continuation), dtype=torch.long)
    n_ctx = len(tok.encode(context))
    x = torch.cat([torch.tensor([tok.eos_id]), ids[:-1]])[None]
    with torch.no_grad():
        logp = run_.model(x)[0].double().log_softmax(-1)  # (L, V)
    pos = torch.arange(n_ctx, len(ids))
    ll = logp[pos, ids[pos]].sum().item()
    greedy = bool((logp[pos].argmax(-1) == ids[pos]).all())
    return ll, greedy


def test_ar_loglikelihood_equals_direct_computation(runs):
    lm = _lm(runs["ar"], batch_size=4)
    pairs = [("To be, or not", " to be"), ("What's in a", " name? That"), ("", "Friends"), ("All the", " world")]
    got = lm.loglikelihood([_req("loglikelihood", c, t) for c, t in pairs])
    for (c, t), (ll, greedy) in zip(pairs, got):
        want, want_greedy = _direct_ar_loglikelihood(lm.run, c, t)
        assert ll == pytest.approx(want, abs=1e-4)
        assert greedy == want_greedy
    # rows of different lengths share a right-padded batch: the same numbers one at a time
    alone = [_lm(runs["ar"], batch_size=1).loglikelihood([_req("loglikelihood", c, t)])[0][0] for c, t in pairs]
    assert [ll for ll, _ in got] == pytest.approx(alone, abs=1e-4)


def test_ar_is_greedy_true_for_the_greedy_continuation(runs):
    lm = _lm(runs["ar"])
    context = "To be, or"
    (text,) = lm.generate_until([_req("generate_until", context, {"until": [], "max_gen_toks": 5})])
    assert len(text) == 5  # a char model: one character per token (no end-of-text in 5 greedy steps here)
    ((ll, greedy),) = lm.loglikelihood([_req("loglikelihood", context, text)])
    assert greedy and ll < 0


def test_ar_rolling_equals_direct_and_covers_long_text(runs):
    lm = _lm(runs["ar"])
    short = "Now is the winter of our"  # fits one window: scored from BOS, nothing given
    (got,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", short)])
    assert got == pytest.approx(_direct_ar_loglikelihood(lm.run, "", short)[0], abs=1e-4)
    long_text = " ".join(LINES[:3])  # 3 windows of 32 tokens
    (ll_long,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", long_text)])
    assert ll_long < got < 0


def test_diffusion_loglikelihood_is_a_finite_negative_bound(runs):
    lm = _lm(runs["mdlm"], mc_samples=4)
    got = lm.loglikelihood([_req("loglikelihood", "To be, or not to", " be"),
                            _req("loglikelihood", "A horse! a horse! my kingdom for a", " horse")])  # context cut
    for ll, greedy in got:
        assert isinstance(greedy, bool)
        assert torch.isfinite(torch.tensor(ll)) and ll < 0
    (rolled,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", " ".join(LINES[:2]))])
    assert torch.isfinite(torch.tensor(rolled)) and rolled < 0


@pytest.mark.parametrize("family", ["ar", "mdlm"])
def test_generate_until_stops_at_the_until_string(family, runs):
    lm = _lm(runs[family])
    context = "Friends, Romans,"
    (free,) = lm.generate_until([_req("generate_until", context, {"until": [], "max_gen_toks": 12})])
    assert len(free) <= 12 and "<|endoftext|>" not in free
    if family == "ar":  # greedy and deterministic: the same text, cut before the stop string
        assert len(free) >= 4
        stop = free[len(free) // 2]
        (cut,) = lm.generate_until([_req("generate_until", context, {"until": [stop], "max_gen_toks": 12})])
        assert cut == free[: free.index(stop)]
    else:  # a sampled diffusion text: whatever it is, nothing from the stop string on is returned
        stops = [" ", "e"]
        outs = lm.generate_until([_req("generate_until", context, {"until": stops, "max_gen_toks": 12,
                                                                    "do_sample": True, "temperature": 1.0})] * 4)
        assert all(not any(s in o for s in stops) for o in outs)


# ─── choices at the token level ─────────────────────────────────────────────────────


class _Merging:
    """A tokenizer that merges "ab" into one token (ids: a=0, b=1, ab=2, space=3)."""

    def encode(self, text):
        out, i = [], 0
        while i < len(text):
            if text.startswith("ab", i):
                out.append(2)
                i += 2
            else:
                out.append({"a": 0, "b": 1, " ": 3}[text[i]])
                i += 1
        return out


def test_encode_pair_splits_the_whole_text():
    tok = _Merging()
    assert encode_pair(tok, "a", "b") == ([0], [1])  # "ab" would leave no continuation: encoded apart
    assert encode_pair(tok, "ba", "bb") == ([1, 2], [1])  # the merged token across the boundary is context
    assert encode_pair(tok, "b ", "a") == ([1], [3, 0])  # trailing space moves to the continuation


def test_truncation_rolling_windows_and_generation_lengths():
    assert truncate_pair([1, 2, 3, 4], [5, 6], 4) == ([3, 4], [5, 6], False)
    assert truncate_pair([1, 2], [3, 4, 5, 6, 7], 4) == ([4], [5, 6, 7], True)
    assert truncate_pair([], [3, 4, 5, 6], 4) == ([3], [4, 5, 6], True)
    for n, L in [(1, 4), (4, 4), (5, 4), (11, 4), (100, 32), (3, 1)]:
        windows = rolling_windows(n, L)
        scored = [i for _, first, end in windows for i in range(first, end)]
        assert scored == list(range(n))  # every token once, in order
        assert all(end - start <= L and start <= first < end for start, first, end in windows)
    assert rolling_windows(11, 4) == [(0, 0, 4), (3, 4, 7), (6, 7, 10), (7, 10, 11)]
    assert generation_lengths(5, 32, 1024) == (5, 32)
    assert generation_lengths(2000, 32, 1024) == (992, 32)
    assert generation_lengths(20, 32, 32) == (16, 16)  # the prompt keeps half a short window
    assert cut_at_stop("abc\n\ndef", ["\n\n", "c"]) == "ab"


# ─── bad input ──────────────────────────────────────────────────────────────────────


def test_unknown_task_is_one_line_and_fast(runs, capsys):
    t0 = time.perf_counter()
    code, _, err = run(["lm-eval", str(runs["ar"]), "--tasks", "no_such_task_xyz"], capsys)
    one_line_error(code, err, "unknown lm-eval task 'no_such_task_xyz'")
    code, _, err = run(["lm-eval", str(runs["ar"]), "--tasks", f"{TASK},nope_nope", "--include-path", str(TASK_DIR)], capsys)
    one_line_error(code, err, "unknown lm-eval task 'nope_nope'")
    # lm-eval's full task index takes 15–25 s to build here: a clearly unknown name must not wait for it
    assert time.perf_counter() - t0 < 30


def test_hub_task_offline_is_one_line(runs, capsys):
    code, _, err = run(["lm-eval", str(runs["ar"]), "--tasks", "hellaswag"], capsys)
    one_line_error(code, err, "lm-eval task 'hellaswag'", "not available offline")


@pytest.mark.parametrize("flag,value", [("--limit", "0"), ("--limit", "-3"), ("--mc-samples", "0"), ("--batch-size", "0")])
def test_bad_values_are_one_line(flag, value, tmp_path, capsys):
    code, _, err = run(["lm-eval", str(tmp_path), "--tasks", TASK, flag, value], capsys)
    one_line_error(code, err, f"{flag} must be ≥ 1, got {value}")


def test_bad_run_and_include_path_are_one_line(runs, tmp_path, capsys):
    code, _, err = run(["lm-eval", str(runs["ar"]), "--tasks", TASK, "--include-path", str(tmp_path / "none")], capsys)
    one_line_error(code, err, "--include-path")
    code, _, err = run(["lm-eval", str(tmp_path), "--tasks", TASK, "--include-path", str(TASK_DIR)], capsys)
    one_line_error(code, err)


def test_a_family_that_names_its_bound_is_named_in_the_header(runs, tmp_path, capsys):
    """gaussian's log-likelihoods are minus its continuous-time VLB, not a NELBO: the table's
    header and the JSON's config say which bound (the name ``dlm eval`` prints)."""
    corpus = runs["ar"].parent / "lines.txt"
    out = tmp_path / "gaussian"
    assert main(["train", "--family", "gaussian", "--data", str(corpus), "--out", str(out), "--steps", "2", *TINY,
                 "process.embed_dim=8"]) == 0
    capsys.readouterr()
    name = load_run(out, "cpu").family.bound_info()["bound_name"]
    code, text, err = run(["lm-eval", str(out), "--tasks", TASK, "--include-path", str(TASK_DIR), "--limit", "2",
                           "--mc-samples", "1"], capsys)
    assert code == 0, err
    head = text.splitlines()[0]
    assert head.startswith(f"gaussian run {out} at step 2: log-likelihoods are lower bounds (minus the {name}, 1 ")
    assert "NELBO" not in head and "VLB" in head
    info = _lm(out, mc_samples=1).get_model_info()  # what the JSON's config carries
    assert info["bound_name"] == name and info["loglikelihood"] == f"lower bound (minus the {name})"
    assert _lm(runs["mdlm"]).get_model_info()["loglikelihood"] == "lower bound (-NELBO)"  # a family that names none
