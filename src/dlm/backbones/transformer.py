"""One transformer for every family.

* bidirectional + adaLN time conditioning + rotary positions: the DiT of MDLM / Duo / SEDD;
* bidirectional without time conditioning: MDLM's default for masked diffusion (the
  number of masks already tells the network the noise level);
* causal: the GPT baseline, with a KV cache for sampling.

Bidirectional models also have a *block* cache (:class:`BlockKV`, Fast-dLLM): one full pass
records every layer's keys and values (``kv_out=``), and later passes run only a window of
positions [start, start + T) whose queries attend to the window's fresh keys and values and
to the recorded ones of every other position (``kv_in=``, ``start=``).

Attention goes through ``F.scaled_dot_product_attention``, which picks flash / memory-
efficient kernels on GPUs that have them; flash-attn is never required.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.utils.checkpoint
import torch.nn.functional as F

from dlm.backbones.base import BACKBONES, Backbone
from dlm.backbones.sizes import resolve_size
from dlm.device import true_positions


@dataclass
class TransformerConfig:
    vocab_in: int  # input tokens (data vocabulary, plus [MASK] for masked diffusion)
    vocab_out: int  # predicted tokens (never [MASK]: the SUBS parameterisation)
    n_layer: int
    n_head: int
    d_model: int
    causal: bool = False
    cond_dim: int = 0  # 0: no time conditioning
    mlp_ratio: int = 4
    dropout: float = 0.0
    rope_base: float = 10000.0
    activation_checkpointing: bool = False  # training: recompute each block's activations in the backward
    # the output layer's rows rounded up to a multiple of this (aligned matmul kernels on GPUs);
    # 0: 64 for a vocabulary of 8,192 or more (GPT-2's 50,257 → 50,304), none below
    vocab_multiple: int = 0

    @property
    def head_rows(self) -> int:
        """Rows of the output layer: ``vocab_out``, padded (the padded rows are never scored,
        sampled or saved: logits are sliced to ``vocab_out``, state dicts hold ``vocab_out`` rows)."""
        multiple = self.vocab_multiple or (64 if self.vocab_out >= 8192 else 1)
        return -(-self.vocab_out // multiple) * multiple


class Rotary(nn.Module):
    """Rotary position embedding (RoFormer), cos/sin tables grown on demand."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cache: tuple[int, torch.device, torch.Tensor, torch.Tensor] | None = None

    def forward(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cache is None or self._cache[0] < length or self._cache[1] != device:
            pos = torch.arange(length, device=device, dtype=torch.float32)
            freqs = torch.outer(pos, self.inv_freq.to(device))  # (T, D/2)
            self._cache = (length, device, freqs.cos(), freqs.sin())
        _, _, cos, sin = self._cache
        return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (T, D/2). Rotates pairs (x_i, x_{i+D/2}), in x's dtype (the
    compute dtype: bf16 under autocast, no float32 round trip; float32 unchanged)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class KVCache:
    """Per-layer keys and values of the tokens seen so far (causal sampling only).

    Without ``max_len`` each decoding step grows them by ``torch.cat`` (a new tensor per layer
    and token). With ``max_len`` (the positions the sample will have) they live in buffers
    (B, H, max_len, D) allocated at the prefill and written in place; attention reads the
    first ``length`` positions (the same numbers as the growing cache). ``static=True``
    (CUDA-graph-ready shapes) attends over the whole buffer instead, the positions not
    written yet hidden by a mask, so every decoding step has the same shapes. ``position``
    (a device tensor, with ``static``) also keeps the next position on the device: writes,
    the mask and the rotary angles read it, and a forward pass advances it in place — a
    decoding step is then the same kernels on the same buffers every time, what a CUDA
    graph replays (:meth:`graph_ready`)."""

    def __init__(self, n_layer: int, max_len: int | None = None, static: bool = False,
                 position: torch.Tensor | None = None):
        if static and max_len is None:
            raise ValueError("a static KV cache needs max_len")
        if position is not None and not static:
            raise ValueError("a KV cache with its position on the device must be static")
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.length = 0
        self.max_len, self.static, self.position = max_len, static, position

    @classmethod
    def graph_ready(cls, n_layer: int, max_len: int, device) -> KVCache:
        """A static cache of ``max_len`` positions whose next position lives on ``device``."""
        return cls(n_layer, max_len, static=True, position=torch.zeros((), dtype=torch.long, device=device))

    def positions(self, T: int, device) -> torch.Tensor:
        """(T,) the positions of the next T tokens, on the device (from ``position`` when set)."""
        now = self.length if self.position is None else self.position
        return now + torch.arange(T, device=device)

    def advance(self, T: int) -> None:
        """T more positions written (the host's count, and the device's in place)."""
        self.length += T
        if self.position is not None:
            self.position.add_(T)

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H, keys, D) the new positions' queries attend over, k and v
        (B, H, T, D) of the positions [length, length + T) included."""
        start, T = self.length, k.shape[2]
        if self.max_len is None:
            if self.k[layer] is not None:
                k, v = torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)
            self.k[layer], self.v[layer] = k, v
            return k, v
        if start + T > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions; {start + T} asked for")
        if self.k[layer] is None:
            shape = (*k.shape[:2], self.max_len, k.shape[3])
            self.k[layer], self.v[layer] = k.new_zeros(shape), v.new_zeros(shape)
        if self.position is not None:  # written at the device's positions: the same kernels every step
            at = self.positions(T, k.device)
            self.k[layer].index_copy_(2, at, k)
            self.v[layer].index_copy_(2, at, v)
        else:
            self.k[layer][:, :, start:start + T] = k
            self.v[layer][:, :, start:start + T] = v
        if self.static:
            return self.k[layer], self.v[layer]
        return self.k[layer][:, :, :start + T], self.v[layer][:, :, :start + T]

    def visible(self, T: int, device: torch.device) -> torch.Tensor:
        """(T, max_len) bool: query i (position length + i) sees the keys at positions ≤ its own."""
        keys = torch.arange(self.max_len, device=device)
        return keys[None] <= self.positions(T, device)[:, None]


class BlockKV:
    """Every layer's keys (RoPE already applied at their positions) and values of all L
    positions of one full pass, (B, H, L, D) each: Fast-dLLM's prefix / dual cache.

    ``Transformer.forward(x, …, kv_out=kv)`` fills it from a full pass of x (B, L);
    ``Transformer.forward(x_win, …, kv_in=kv, start=s)`` then runs only the window
    x_win (B, T) at positions [s, s + T): the window's own keys and values are computed
    fresh, every other position's are taken from ``kv``. The cache is exact when the
    positions outside the window have not changed *and* their keys did not depend on the
    window (never true for a bidirectional model whose window changed since the record:
    that is the approximation Fast-dLLM measures and accepts).
    """

    def __init__(self):
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    def put(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if layer == len(self.k):
            self.k.append(k)
            self.v.append(v)
        else:
            self.k[layer], self.v[layer] = k, v

    @property
    def length(self) -> int:
        """L: the positions recorded."""
        return self.k[0].shape[2] if self.k else 0

    def __len__(self) -> int:
        return len(self.k)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout
        self.causal = cfg.causal

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0, attn_mask=None,
                kv_in: BlockKV | None = None, kv_out: BlockKV | None = None, start: int = 0):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # (B, H, T, D)
        is_causal = self.causal
        if kv_out is not None:  # a full pass: record this layer's keys and values
            kv_out.put(layer, k, v)
        if kv_in is not None:  # a window [start, start + T): the other positions' K/V from the record
            ck, cv = kv_in.k[layer], kv_in.v[layer]  # (B, H, L, D)
            k = torch.cat([ck[:, :, :start], k, ck[:, :, start + T:]], dim=2)
            v = torch.cat([cv[:, :, :start], v, cv[:, :, start + T:]], dim=2)
        if cache is not None:
            if cache.k[layer] is not None:
                # decoding: the new queries come after every cached key
                if T != 1:
                    raise ValueError("a KV cache decodes one token at a time after the prefill")
                is_causal = False
            k, v = cache.extend(layer, k, v)
            if cache.static:  # the whole buffer: the causal rule and the unwritten positions as a mask
                attn_mask, is_causal = cache.visible(T, x.device), False
        if attn_mask is not None:  # padding hidden: the causal rule is then part of the mask
            is_causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        hidden = cfg.mlp_ratio * cfg.d_model
        self.fc = nn.Linear(cfg.d_model, hidden, bias=True)
        self.proj = nn.Linear(hidden, cfg.d_model, bias=True)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class Block(nn.Module):
    """Pre-norm block; with ``cond_dim`` > 0 the norms are adaLN-modulated and the residual
    branches gated by the time embedding (DiT), with the modulation initialised to zero."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model, bias=False)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.d_model, bias=False)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.ada = nn.Linear(cfg.cond_dim, 6 * cfg.d_model) if cfg.cond_dim else None

    def forward(self, x, c, cos, sin, cache=None, layer=0, attn_mask=None, **kv):
        if self.ada is None:
            x = x + self.drop(self.attn(self.norm1(x), cos, sin, cache, layer, attn_mask, **kv))
            return x + self.mlp(self.norm2(x))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)[:, None].chunk(6, dim=-1)
        h = self.attn(modulate(self.norm1(x), shift1, scale1), cos, sin, cache, layer, attn_mask, **kv)
        x = x + gate1 * self.drop(h)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class TimeEmbedding(nn.Module):
    """Sinusoidal features of t ∈ [0, 1] followed by an MLP (DiT's TimestepEmbedder)."""

    def __init__(self, cond_dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
        args = 1000.0 * t.float()[:, None] * freqs[None]  # scale t to DiT's integer-step range
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


def _unpad_head(module: "Transformer", state: dict, prefix: str, local_metadata) -> None:
    """State-dict hook: the output layer's first ``vocab_out`` rows (the padding is not saved)."""
    for name in ("head.weight", "head.bias"):
        if prefix + name in state:
            state[prefix + name] = state[prefix + name][:module.cfg.vocab_out]


def _pad_head(module: "Transformer", state: dict, prefix: str, *args) -> None:
    """Load pre-hook: an output layer of ``vocab_out`` rows (every run folder's) padded with zeros."""
    for name in ("head.weight", "head.bias"):
        key = prefix + name
        if key in state and state[key].shape[0] == module.cfg.vocab_out:
            pad = state[key].new_zeros((module.cfg.head_rows - module.cfg.vocab_out, *state[key].shape[1:]))
            state[key] = torch.cat([state[key], pad])


@BACKBONES.register("transformer")
class Transformer(Backbone):
    """The :class:`~dlm.backbones.base.Backbone` contract, plus the caches of the module
    docstring. ``forward`` reads in steps: the input vectors (``input_vectors``) and their
    positions (:meth:`_positions`), the time conditioning (:meth:`_condition`), the attention
    mask (:meth:`_attention_mask`), the blocks (:meth:`_blocks`) and the output layer
    (:meth:`_output`)."""

    # CUDA-graph-ready: a KVCache.graph_ready cache decodes with the position on the device, and
    # head_fn / logits_of split a whole-batch call into a fixed-shape trunk and the output layer
    graph_ready = True

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_in, cfg.d_model)
        self.rotary = Rotary(cfg.d_model // cfg.n_head, cfg.rope_base)
        self.time = TimeEmbedding(cfg.cond_dim) if cfg.cond_dim else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.LayerNorm(cfg.d_model, bias=False)
        self.final_ada = nn.Linear(cfg.cond_dim, 2 * cfg.d_model) if cfg.cond_dim else None
        self.head = nn.Linear(cfg.d_model, cfg.head_rows, bias=True)
        self.head_positions = 0  # positions the output layer ran on in training (MFU: the work done)
        self._init_weights()
        if cfg.head_rows != cfg.vocab_out:  # run folders hold vocab_out rows, before padding and after
            self._register_state_dict_hook(_unpad_head)
            self._register_load_state_dict_pre_hook(partial(_pad_head, self))

    @classmethod
    def build(cls, model_cfg, *, vocab_in: int, vocab_out: int, causal: bool, cond_dim: int) -> Transformer:
        """The transformer of ``model_cfg``'s size preset, with its explicit fields overriding it."""
        size = resolve_size(model_cfg)
        return cls(
            TransformerConfig(
                vocab_in=vocab_in,
                vocab_out=vocab_out,
                n_layer=size.n_layer,
                n_head=size.n_head,
                d_model=size.d_model,
                causal=causal,
                cond_dim=cond_dim,
                mlp_ratio=model_cfg.mlp_ratio,
                dropout=model_cfg.dropout,
                activation_checkpointing=model_cfg.activation_checkpointing,
            )
        )

    def _init_weights(self):
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        # residual projections scaled by depth (GPT-2)
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * self.cfg.n_layer))
        # adaLN-zero (DiT) and a zero output layer: the untrained model predicts uniformly
        for block in self.blocks:
            if block.ada is not None:
                nn.init.zeros_(block.ada.weight)
                nn.init.zeros_(block.ada.bias)
        if self.final_ada is not None:
            nn.init.zeros_(self.final_ada.weight)
            nn.init.zeros_(self.final_ada.bias)
        nn.init.zeros_(self.head.weight)

    # the contract's attributes, read from the config (no state: the state_dict is unchanged)
    @property
    def d_model(self) -> int:
        return self.cfg.d_model

    @property
    def vocab_in(self) -> int:
        return self.cfg.vocab_in

    @property
    def vocab_out(self) -> int:
        return self.cfg.vocab_out

    @property
    def causal(self) -> bool:
        return self.cfg.causal

    @property
    def time_conditioned(self) -> bool:
        return self.time is not None

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        x: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
        cache: KVCache | None = None,
        score_mask: torch.Tensor | None = None,
        pad: torch.Tensor | None = None,
        *,
        embeds: torch.Tensor | None = None,
        kv_in: BlockKV | None = None,
        kv_out: BlockKV | None = None,
        start: int = 0,
        head_fn=None,
        score_count: int | None = None,
    ) -> torch.Tensor:
        """x (B, T) ids or embeds (B, T, C), t, score_mask, pad and head_fn: the
        :class:`~dlm.backbones.base.Backbone` contract. With a ``cache``, the input holds the
        tokens after ``cache.length`` and positions continue from there.

        Block cache (bidirectional models only): ``kv_out`` (a :class:`BlockKV`) is filled with
        every layer's keys and values of this full pass. With ``kv_in`` (recorded from a pass
        over L positions), the input (B, T) is the window [start, start + T) of that sequence:
        it attends to its own fresh keys and values and to ``kv_in``'s at every other position;
        ``score_mask`` is then (B, T) over the window and ``pad`` (B, L) over the whole
        sequence (the keys span all of it). Without ``pad`` attention runs unmasked (on GPUs:
        the flash kernels). ``score_count``: the number of true positions of ``score_mask``,
        when the caller knows it on the host (the gather then makes no host synchronisation).
        """
        h = self.input_vectors(x, embeds)  # (B, T, C)
        B, T, _ = h.shape
        start, keys_len = self._positions(B, T, cache, kv_in, kv_out, start)
        cos, sin = self._angles(T, start, keys_len, cache, h.device)  # (T, D/2): positions start … start + T - 1
        c = self._condition(t)  # (B, cond_dim) or None
        attn_mask = self._attention_mask(pad, T, start, keys_len, cache, kv_in, h.device)
        kv = {} if kv_in is None and kv_out is None else {"kv_in": kv_in, "kv_out": kv_out, "start": start}
        h = self._blocks(h, c, cos, sin, cache, attn_mask, kv)  # (B, T, C)
        if cache is not None:
            cache.advance(T)
        return self._output(h, c, score_mask, head_fn, score_count)

    def _angles(self, T: int, start: int, keys_len: int, cache: KVCache | None, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary cos / sin (T, D/2) of the input's positions (read on the device when the
        cache keeps its position there)."""
        if cache is not None and cache.position is not None:
            cos, sin = self.rotary(cache.max_len, device)
            at = cache.positions(T, device)
            return cos[at], sin[at]
        cos, sin = self.rotary(max(start + T, keys_len), device)
        return cos[start : start + T], sin[start : start + T]

    def _positions(self, B: int, T: int, cache: KVCache | None, kv_in: BlockKV | None,
                   kv_out: BlockKV | None, start: int) -> tuple[int, int]:
        """(start, keys): the position of the input's first token, and how many keys its
        queries attend over (T, or the L recorded in ``kv_in``). Refuses cache arguments that
        do not go together."""
        if kv_in is not None or kv_out is not None:
            if cache is not None or self.cfg.causal or (kv_in is not None and kv_out is not None):
                raise ValueError("the block cache is for bidirectional models: record (kv_out) or read (kv_in), "
                                 "without a KV cache")
        if kv_in is not None:
            keys_len = kv_in.length
            if len(kv_in) != len(self.blocks) or not 0 <= start <= keys_len - T or kv_in.k[0].shape[0] != B:
                raise ValueError(f"window [{start}, {start + T}) of {B} rows does not fit the recorded "
                                 f"{keys_len} positions of {kv_in.k[0].shape[0] if len(kv_in) else 0} rows")
            return start, keys_len
        if start:
            raise ValueError("start= is the position of a window: it needs kv_in")
        return (cache.length if cache is not None else 0), T

    def _condition(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """c (B, cond_dim): the adaLN conditioning of times t (B,); None without time conditioning."""
        if self.time is None:
            return None
        if t is None:
            raise ValueError("this backbone is time-conditioned: pass t")
        return F.silu(self.time(t))

    def _attention_mask(self, pad: torch.Tensor | None, T: int, start: int, keys_len: int,
                        cache: KVCache | None, kv_in: BlockKV | None, device: torch.device) -> torch.Tensor | None:
        """(B, 1, T, keys) bool, True where a query may attend, from ``pad`` (B, keys): no query
        attends to a padded key, and each padded query still sees itself (so no row of the
        attention is empty). None without padding: attention then runs unmasked."""
        if pad is None:
            return None
        if cache is not None:
            raise ValueError("padding is not supported with a KV cache")
        keys = ~pad[:, None, None, :]  # (B, 1, 1, keys): attend to non-padded keys …
        if kv_in is None:
            eye = torch.eye(T, dtype=torch.bool, device=device)  # … and to oneself, (T, T)
        else:  # (T, L): query i of the window is key start + i
            eye = torch.arange(keys_len, device=device)[None] == start + torch.arange(T, device=device)[:, None]
        attn_mask = keys | eye
        if self.cfg.causal:  # the causal rule is then part of the mask
            attn_mask = attn_mask & torch.ones(T, T, dtype=torch.bool, device=device).tril()
        return attn_mask

    def _blocks(self, h: torch.Tensor, c, cos, sin, cache: KVCache | None, attn_mask, kv: dict) -> torch.Tensor:
        """h (B, T, C) through every block, (B, T, C); with activation checkpointing in training,
        only each block's input is kept and its activations are recomputed in the backward."""
        recompute = self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for i, block in enumerate(self.blocks):
            if recompute:
                h = torch.utils.checkpoint.checkpoint(block, h, c, cos, sin, None, i, attn_mask, use_reentrant=False, **kv)
            else:
                h = block(h, c, cos, sin, cache, i, attn_mask, **kv)
        return h

    @torch.compiler.disable  # a counter, not part of any graph (an int attribute would be guarded on)
    def _count_head(self, positions: int) -> None:
        self.head_positions += positions

    def logits_of(self, h: torch.Tensor) -> torch.Tensor:
        """The output layer at hidden states h (…, C): logits (…, vocab_out) in the compute
        dtype, the padded rows of the layer left out."""
        out = self.head(h)
        return out if self.cfg.head_rows == self.cfg.vocab_out else out[..., :self.cfg.vocab_out]

    def _output(self, h: torch.Tensor, c, score_mask: torch.Tensor | None, head_fn,
                score_count: int | None = None) -> torch.Tensor:
        """The final norm (adaLN-modulated with time conditioning), then the output layer at the
        ``score_mask`` positions: float32 logits (B, T, V) or (N, V), or ``head_fn(head, h)``."""
        h = self.norm(h)  # (B, T, C)
        if self.final_ada is not None:
            shift, scale = self.final_ada(c)[:, None].chunk(2, dim=-1)  # (B, 1, C) each
            h = modulate(h, shift, scale)
        if score_mask is not None and score_count is not None:  # (N, C) by flat indices: no host sync
            h = h.reshape(-1, h.shape[-1])[true_positions(score_mask, score_count)]
        elif score_mask is not None:
            h = h[score_mask]  # (N, C), row-major order
        if self.training and torch.is_grad_enabled():
            self._count_head(h.shape[:-1].numel())  # a shape: known on the host
        if head_fn is not None:  # the layer itself; a padded one as its logits sliced to vocab_out
            return head_fn(self.head if self.cfg.head_rows == self.cfg.vocab_out else self.logits_of, h)
        return self.logits_of(h).float()  # (B, T, V) or (N, V)
