"""SDDLM on a small vocabulary: why `sddlm-v2`'s NELBO is far above a uniform model's.

A new user's experiment, reproduced and taken apart: text from a 16-letter Markov source of
known entropy rate, the `char` tokenizer (V = 18: 16 letters, end-of-text, unknown), the
tiny backbone for 300 steps, one uniform-state model per objective; then

* `dlm eval` of each (the exact NELBO of the network's own x_θ, and of the carry-over
  x_θ = (1 − λ) softmax + λ e_{x_t} for a few λ — `dlm eval --carry λ`);
* the mechanism: on held-out blocks corrupted at a grid of times t, the network's mean
  probability of its own input token x_t where noise left the token alone (kept) and where
  it changed it, its mean probability of x0 where changed, and the NELBO integrand split
  into the part paid at kept and at changed positions, integrated over t.

`--setup bpe4096` does the same at V = 4,096 (the shipped quickstart config: Shakespeare, BPE,
sequences of 128), same steps, for `nelbo`, `sddlm` and `sddlm-v2`: the contrast in vocabulary.

    python benchmarks/sddlm/small_vocab.py                   # ~2.5 h on 2 busy CPU cores
    python benchmarks/sddlm/small_vocab.py --setup bpe4096   # ~1 h
    python benchmarks/sddlm/small_vocab.py --steps 30 --work /tmp/sv --only nelbo,sddlm-v2   # smoke

Runs go to --work (default runs/bench-sddlm-small; a finished run is reused). Writes
benchmarks/sddlm/small_vocab.json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
from foundation import dlm_out as dlm, finished, machine  # noqa: E402

LN2 = math.log(2)
VARIANTS = {  # key: (objective, overrides)
    "nelbo": ("nelbo", []),
    "naive": ("naive", []),
    "sddlm": ("sddlm", []),
    "sddlm-v1": ("sddlm-v1", []),
    "sddlm-v2": ("sddlm-v2", []),
    # the mechanism's prediction: a larger ε inside V2's log stops pushing p(x_t) down sooner
    "sddlm-v2 eps=0.01": ("sddlm-v2", ["objective.reg_eps=0.01"]),
    # the cross-entropy over every resampled position (docs/uniform.md): never denies x_t
    "sddlm where=noised": ("sddlm", ["objective.where=noised"]),
}
BPE_VARIANTS = ["nelbo", "sddlm", "sddlm-v2"]
CARRY = [0.01, 0.05, 0.2, 0.5]


def markov_source(letters: int, successors: int, seed: int):
    """Transition matrix (each letter → ``successors`` others, Dirichlet(1) weights), its
    stationary law and entropy rate H = −Σ π_i P_ij log P_ij (nats)."""
    rng = np.random.default_rng(seed)
    P = np.zeros((letters, letters))
    for i in range(letters):
        P[i, rng.choice(letters, size=successors, replace=False)] = rng.dirichlet(np.ones(successors))
    evals, evecs = np.linalg.eig(P.T)
    pi = np.real(evecs[:, np.argmin(np.abs(evals - 1))])
    pi /= pi.sum()
    logs = np.log(P, where=P > 0, out=np.zeros_like(P))
    return P, pi, float(-(pi[:, None] * P * logs).sum())


def markov_text(P, pi, n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    cdf, u = P.cumsum(1), rng.random(n)
    state, out = rng.choice(len(pi), p=pi), np.empty(n, dtype=np.int64)
    for i in range(n):
        out[i] = state
        state = min(int(np.searchsorted(cdf[state], u[i])), len(pi) - 1)
    return "".join(chr(ord("a") + s) for s in out)


@torch.no_grad()
def mechanism(run_dir: Path, blocks: int, nodes: int, seed: int) -> dict:
    """Per time t (Gauss–Legendre in u, t = u², which follows the log(1/t) growth near 0):
    mean x_θ(x_t) at kept and at changed positions, mean x_θ(x0) at changed positions, and
    the NELBO integrand per token split into kept and changed positions; the integrals; and
    the parts of the bounded piece below t = ε, per token."""
    from dlm.batch import Batch
    from dlm.data import prepare_data
    from dlm.runs import load_run

    run = load_run(run_dir, "cpu")
    fam, model = run.family, run.model.eval()
    rows, _ = prepare_data(run.cfg.data, run.tokenizer).rows("val", run.cfg.data.seq_len)
    x0 = torch.from_numpy(rows[np.linspace(0, len(rows) - 1, min(blocks, len(rows))).round().astype(int)].astype(np.int64))
    gen = torch.Generator().manual_seed(seed)
    u, w = np.polynomial.legendre.leggauss(nodes)
    u, w = (u + 1) / 2, w / 2
    per_t, kept_int, changed_int = [], 0.0, 0.0
    for ui, wi in zip(u, w):
        t = torch.full((len(x0),), float(ui * ui))
        xt, noised = fam.process.corrupt_with_noise(x0, t, gen)
        logits = model(xt, t if fam.time_conditioned else None)  # (B, L, V)
        p = logits.float().softmax(-1)
        own = p.gather(-1, xt[..., None])[..., 0]
        truth = p.gather(-1, x0[..., None])[..., 0]
        kept, changed = xt == x0, xt != x0
        f = fam.bound.per_position(logits.reshape(-1, logits.shape[-1]), x0.reshape(-1), xt.reshape(-1),
                                   t.repeat_interleave(x0.shape[1]), fam.process).view(x0.shape)
        fk, fc = float((f * kept).sum() / f.numel()), float((f * changed).sum() / f.numel())
        kept_int += 2 * ui * wi * fk  # dt = 2u du
        changed_int += 2 * ui * wi * fc
        per_t.append({"t": float(ui * ui), "kept_fraction": float(kept.double().mean()),
                      "p_own_kept": float(own[kept].mean()), "p_own_changed": float(own[changed].mean()) if changed.any() else None,
                      "p_x0_changed": float(truth[changed].mean()) if changed.any() else None,
                      "integrand_kept": fk, "integrand_changed": fc})
    # the piece below t = ε that `dlm eval` bounds and adds (USDM.tail), per token, by part
    tail = {name: float(v.sum()) / x0.numel() for name, v in fam.tail(model, Batch(x0), gen).items()}
    return {"blocks": len(x0), "nodes": nodes, "per_t": per_t, "kept_nats": kept_int, "changed_nats": changed_int,
            "tail_nats": tail}


def evaluate(run: Path, key: str, mc_samples: int, max_tokens: int, blocks: int, nodes: int, seed: int) -> dict:
    """`dlm eval` of ``run`` for every x_θ (the network's, then each carry), and the mechanism."""
    objective, extra = VARIANTS[key]
    row = {"key": key, "objective": objective, "overrides": extra}
    for carry in [0.0, *CARRY]:
        ev = json.loads(dlm("eval", str(run), "--json", "--max-tokens", str(max_tokens), "--mc-samples", str(mc_samples),
                            *(["--carry", str(carry)] if carry else [])))
        row["nelbo" if not carry else f"carry {carry}"] = {
            "bits_per_token": ev["bits_per_token"], "stderr_bits": ev["stderr"] / LN2, "tokens": ev["tokens"],
            "x_theta": ev["x_theta"]}
    row["mechanism"] = mechanism(run, blocks, nodes, seed)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--setup", choices=["markov16", "bpe4096"], default="markov16",
                    help="markov16: the 16-letter source, char tokens (V = 18); bpe4096: the shipped quickstart "
                         "config (Shakespeare, BPE 4,096, sequences of 128), the same steps, for contrast")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--chars", type=int, default=200_000)
    ap.add_argument("--mc-samples", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--blocks", type=int, default=64, help="held-out blocks for the mechanism measurement")
    ap.add_argument("--nodes", type=int, default=24, help="time nodes for the mechanism measurement")
    ap.add_argument("--work", default="runs/bench-sddlm-small")
    ap.add_argument("--out", default=str(HERE / "small_vocab.json"), help="results JSON (read, merged, rewritten)")
    ap.add_argument("--only", help=f"comma-separated variants (default: all of {', '.join(VARIANTS)} for markov16; "
                                   f"{', '.join(BPE_VARIANTS)} for bpe4096)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"models": []}
    command = " ".join(sys.argv)
    if args.setup == "bpe4096":
        keys = args.only.split(",") if args.only else BPE_VARIANTS
        part = results.setdefault("bpe4096", {"models": []})
        part.update({"command": command, "date": time.strftime("%Y-%m-%d"), "steps": args.steps,
                     "mc_samples": args.mc_samples, "max_tokens": 16384})
        for key in keys:
            objective, extra = VARIANTS[key]
            run = work / ("bpe4096-" + key.replace(" ", "_").replace("=", "-"))
            if not finished(run, args.steps):
                dlm("train", "--config", "quickstart", "--family", "usdm", "--objective", objective, "--steps",
                    str(args.steps), "--seed", str(args.seed), "--out", str(run), "--quiet", "train.time_budget_s=0", *extra)
            row = evaluate(run, key, args.mc_samples, 16384, args.blocks, args.nodes, args.seed)
            part["models"] = [m for m in part["models"] if m["key"] != key] + [row]
            out.write_text(json.dumps(results, indent=1))
            print(f"bpe4096 {key}: {row['nelbo']['bits_per_token']:.3f} bits/token", flush=True)
        print_tables(results)
        return
    P, pi, H = markov_source(16, 8, args.seed)
    data = work / "markov16.txt"
    if not data.is_file():
        data.write_text(markov_text(P, pi, args.chars, args.seed + 1))
    unigram = float(-(pi * np.log(pi)).sum())
    keys = args.only.split(",") if args.only else list(VARIANTS)
    results.update({"machine": machine(), "date": time.strftime("%Y-%m-%d"), "command": command,
                    "steps": args.steps, "mc_samples": args.mc_samples, "chars": args.chars,
                    "source": {"letters": 16, "successors": 8, "vocab": 18, "entropy_rate_bits": H / LN2,
                               "unigram_bits": unigram / LN2, "uniform_bits": math.log2(18)}})
    train = ["--family", "usdm", "--data", str(data), "--tokenizer", "char", "--size", "tiny", "--seq-len", "64",
             "--batch-size", "32", "--steps", str(args.steps), "--lr", "3e-3", "--seed", str(args.seed), "--quiet",
             "train.warmup_steps=20"]
    for key in keys:
        objective, extra = VARIANTS[key]
        run = work / key.replace(" ", "_").replace("=", "-")
        if not finished(run, args.steps):
            dlm("train", *train, "--objective", objective, "--out", str(run), *extra)
        row = evaluate(run, key, args.mc_samples, 0, args.blocks, args.nodes, args.seed)
        results["models"] = [m for m in results["models"] if m["key"] != key] + [row]
        out.write_text(json.dumps(results, indent=1))
        print(f"{key}: {row['nelbo']['bits_per_token']:.3f} bits/token", flush=True)
    print_tables(results)
    print(f"\nwritten to {out}")


def print_tables(results: dict) -> None:
    src = results["source"]
    print(f"\nsource: entropy rate {src['entropy_rate_bits']:.3f} bits, unigram {src['unigram_bits']:.3f}, "
          f"uniform log2 18 = {src['uniform_bits']:.3f}")
    print_models(results["models"])
    if "bpe4096" in results:
        print("\nShakespeare, BPE 4,096 (uniform: 12 bits)")
        print_models(results["bpe4096"]["models"])


def print_models(models: list) -> None:
    carries = [k for k in models[0] if k.startswith("carry ")]
    print("| model | NELBO bits/token | " + " | ".join(f"x_θ {c}" for c in carries)
          + " | kept / changed part (bits) | below ε (bits) | x_θ(x_t) kept, t≈0.01 / 0.25 | x_θ(x_t) changed "
          "| x_θ(x0) changed |")
    print("|---" * (7 + len(carries)) + "|")
    for m in models:
        mech = m["mechanism"]

        def near(t):
            return min(mech["per_t"], key=lambda r: abs(r["t"] - t))

        changed = [r for r in mech["per_t"] if r["p_own_changed"] is not None and r["t"] > 0.05]
        print(f"| {m['key']} | {m['nelbo']['bits_per_token']:.3f} ± {m['nelbo']['stderr_bits']:.3f} | "
              + " | ".join(f"{m[c]['bits_per_token']:.3f}" for c in carries)
              + f" | {mech['kept_nats'] / LN2:.3f} / {mech['changed_nats'] / LN2:.3f} | "
              f"{sum(mech.get('tail_nats', {}).values()) / LN2:.2e} | "
              f"{near(0.01)['p_own_kept']:.2e} / {near(0.25)['p_own_kept']:.2e} | "
              f"{np.mean([r['p_own_changed'] for r in changed]):.2e} | {np.mean([r['p_x0_changed'] for r in changed]):.3f} |")


if __name__ == "__main__":
    main()
