"""The output layer and a weighted cross-entropy fused, the gradient formed in the forward.

Every objective whose loss is a weighted cross-entropy over its scored positions
(``Objective.token_weights``: AR's, MDLM's, …) is scored in training by
:class:`FusedLinearCrossEntropy` (``train.fused_head``, on by default): the N rows of hidden
states run through the output layer a chunk at a time (Liger-Kernel's / cut-cross-entropy's
design, Wijmans et al. 2024, arXiv 2411.09009), each chunk's logits in the compute dtype
(bf16 under autocast), their log-sum-exp and softmax in float32, and the chunk's gradient with
respect to the hidden states and the layer's weight and bias computed there and then and
kept. The (N, V) logits and their gradient never exist at once: one chunk's, about the size of
the hidden states, at a time; what the backward keeps is the gradient itself, (N, C) for the
hidden states and one float32 copy of the layer. The backward only scales it.

Rows of a padded layer (``TransformerConfig.vocab_multiple``) take part in the matmuls (which
stay aligned) and are left out of the log-sum-exp: never scored, their gradient zero.

The gradient is formed for the loss Σ_n out_n, and the backward scales it by the incoming
gradient: exact when that gradient is the same at every position with a non-zero weight,
which is what the training loop gives (``scored.nats.sum().backward()``; per-sequence sums of
the positions pass it on unchanged). A caller that weighs sequences differently must fold its
weights into ``weights``; the backward refuses another gradient (``torch._assert_async``: no
host synchronisation).

On CUDA, with ``liger-kernel`` installed, Liger's fused Triton kernel computes the unweighted
per-position cross-entropy instead (``reduction="none"``, the weights applied to its output);
Liger's backward of that mode was wrong for a non-uniform incoming gradient before its PR
#1298, so it is used only after a small self-check against this module's function passes in
the process (:func:`liger_usable`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from dlm.objectives.base import Scored, per_sequence


def compute_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmuls run in: autocast's where it is on, the weight's otherwise."""
    kind = h.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return weight.dtype


def chunk_rows(n: int, rows: int, width: int) -> int:
    """Rows per chunk: about as many logits as the hidden states have values (Liger's rule,
    ⌈n / ⌈rows / width⌉⌉ rounded up to a power of two)."""
    per = math.ceil(n / max(1, math.ceil(rows / width)))
    return max(1, min(n, 1 << max(0, per - 1).bit_length()))


class FusedLinearCrossEntropy(torch.autograd.Function):
    """out_n = weights_n · (logsumexp(z_n[:vocab]) − z_n[target_n]), z_n = h_n Wᵀ + b, (N,) float32,
    from h (N, C), the layer's weight (R, C) and bias (R,) or None (R ≥ vocab rows: the padded
    ones are never scored), target (N,) ids and weights (N,) float; ``chunk`` rows at a time."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, weights, vocab: int, chunk: int, body=None):
        body = body or logit_gradient  # or its compiled twin (train.compile)
        dtype = compute_dtype(h, weight)
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            ce = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
            grad_h = torch.empty_like(h)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
            grad_b = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=h.device)
            scale = weights.float()
            for s in range(0, h.shape[0], chunk):
                e = min(s + chunk, h.shape[0])
                hc = h[s:e].to(dtype)
                logits = hc @ w.t() if b is None else torch.addmm(b, hc, w.t())  # (n, R)
                ce[s:e], g = body(logits, target[s:e], scale[s:e], vocab)
                grad_h[s:e] = (g @ w).to(h.dtype)
                grad_w.add_(g.t() @ hc)
                if grad_b is not None:
                    grad_b.add_(g.float().sum(0))
        ctx.save_for_backward(grad_h, grad_w, grad_b, ce, weights)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return ce * scale

    @staticmethod
    def backward(ctx, grad):
        grad_h, grad_w, grad_b, ce, weights = ctx.saved_tensors
        used = weights != 0
        hi = torch.where(used, grad, -math.inf).amax() if grad.numel() else grad.new_zeros(())
        lo = torch.where(used, grad, math.inf).amin() if grad.numel() else grad.new_zeros(())
        torch._assert_async((hi == lo) | ~used.any(),
                            "FusedLinearCrossEntropy: the incoming gradient differs between scored positions")
        scale = torch.where(used.any(), hi, 0.0)  # the common value (0 if nothing is scored)
        dh = grad_h * grad.to(grad_h.dtype)[:, None]
        dw = (grad_w * scale).to(ctx.dtypes[0])
        db = None if grad_b is None else (grad_b * scale).to(ctx.dtypes[1])
        dweights = (grad * ce).to(weights.dtype) if ctx.needs_input_grad[4] else None
        return dh, dw, db, None, dweights, None, None, None


def logit_gradient(logits: torch.Tensor, target: torch.Tensor, scale: torch.Tensor, vocab: int):
    """One chunk's (ce (n,) float32, ∂out/∂logits (n, R) in the logits' dtype) from its logits
    (n, R): the log-sum-exp and softmax over the first ``vocab`` columns in float32, the
    padded columns' gradient zero, out = scale · ce."""
    g = logits.float()
    z = g[:, :vocab]  # the scored columns (a view)
    lse = z.logsumexp(-1)
    picked = z.gather(-1, target[:, None])[:, 0]
    z.sub_(lse[:, None]).exp_()  # in place: g holds the softmax, the gradient of lse …
    g[:, vocab:] = 0.0  # … zero at the padded columns
    g.scatter_add_(-1, target[:, None], torch.full_like(picked[:, None], -1.0))
    return lse - picked, g.mul_(scale[:, None]).to(logits.dtype)


_COMPILED: list = []


def compiled_logit_gradient():
    """:func:`logit_gradient` under ``torch.compile`` (one kernel or two per chunk instead of
    ~8 passes over (n, R) float32), built once per process."""
    if not _COMPILED:
        _COMPILED.append(torch.compile(logit_gradient))
    return _COMPILED[0]


def linear_layer(head) -> tuple[nn.Linear, int] | None:
    """(layer, vocab) of the output layer a backbone hands to a ``head_fn``: the layer itself,
    or a padded transformer's ``logits_of`` (its ``head``, ``vocab_out`` rows scored); None for
    anything else (a pretrained backbone hands over logits already computed)."""
    if isinstance(head, nn.Linear):
        return head, head.out_features
    owner = getattr(head, "__self__", None)
    layer = getattr(owner, "head", None)
    if isinstance(layer, nn.Linear) and getattr(head, "__name__", "") == "logits_of":
        return layer, owner.vocab_out
    return None


def fused_ce(layer: nn.Linear, vocab: int, h: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
             chunk: int | None = None, compiled: bool = False) -> torch.Tensor:
    """(…) weights · −log softmax(layer(h))[target] over the first ``vocab`` logits, h (…, C):
    Liger's kernel where it is usable (CUDA), :class:`FusedLinearCrossEntropy` otherwise (its
    per-chunk logit gradient compiled with ``compiled``)."""
    shape = target.shape
    h, target, weights = h.reshape(-1, h.shape[-1]), target.reshape(-1), weights.reshape(-1)
    if h.is_cuda and chunk is None and liger_usable(h.device):
        out = liger_ce(h, layer.weight[:vocab], target, None if layer.bias is None else layer.bias[:vocab]) * weights
    else:
        rows = chunk or chunk_rows(h.shape[0], layer.weight.shape[0], h.shape[1])
        body = compiled_logit_gradient() if compiled else logit_gradient
        out = FusedLinearCrossEntropy.apply(h, layer.weight, layer.bias, target, weights, vocab, rows, body)
    return out.view(shape)


def liger_ce(h, weight, target, bias):
    """Liger's per-position cross-entropy (N,), float32 (its functional API, whichever version)."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    out = liger_fused_linear_cross_entropy(h, weight, target, bias=bias, reduction="none")
    out = out[0] if isinstance(out, tuple) else getattr(out, "loss", out)
    return out.float()


_LIGER: dict = {}


def liger_usable(device: torch.device) -> bool:
    """Whether liger-kernel is installed and its per-position loss and gradients match
    :class:`FusedLinearCrossEntropy` on a small case with a non-uniform incoming gradient
    (checked once per process and device)."""
    key = str(device)
    if key not in _LIGER:
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            _LIGER[key] = False
            return False
        _LIGER[key] = _liger_agrees(device)
    return _LIGER[key]


def _liger_agrees(device: torch.device) -> bool:
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(37, 16, device=device, generator=g, requires_grad=True)
    w = torch.randn(50, 16, device=device, generator=g, requires_grad=True)
    target = torch.randint(0, 50, (37,), device=device, generator=g)
    up = torch.rand(37, device=device, generator=g)  # a per-position incoming gradient
    grads = []
    try:
        for ce in (liger_ce(h, w, target, None), ref_ce(h, w, target)):
            grads.append((ce.detach(), *torch.autograd.grad((ce * up).sum(), (h, w))))
    except Exception:  # noqa: BLE001 — any failure of the optional kernel means: do not use it
        return False
    return all(torch.allclose(a, b, rtol=1e-3, atol=1e-4) for a, b in zip(*grads))


def ref_ce(h, w, target):
    return nn.functional.cross_entropy(h.float() @ w.float().t(), target, reduction="none")


def fused_score(objective, process, weighted: tuple[torch.Tensor, torch.Tensor], c, where: torch.Tensor,
                head, h: torch.Tensor):
    """Scored of a weighted cross-entropy ``objective`` (``weighted``: its ``token_weights``) from
    hidden states h (N, C) at ``where`` (B, L), by the fused head (a ``head_fn`` for
    ``Transformer.forward``); a head that is not a linear layer is scored the plain way."""
    found = linear_layer(head)
    if found is None:
        return objective(head(h).float(), c, where, process)
    weights, count = weighted
    return Scored(per_sequence(fused_ce(*found, h, c.x0[where], weights[where]), where), count)
