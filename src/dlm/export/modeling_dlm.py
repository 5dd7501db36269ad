"""A dlm transformer as a Hugging Face model: the file ``dlm export`` copies next to
config.json, so that ``AutoModel.from_pretrained(FOLDER, trust_remote_code=True)`` loads it
with torch and transformers only (nothing of dlm).

The forward is dlm's (``dlm.backbones.transformer``) written out again, with the same
parameter names, so the weights load as they are and the logits are dlm's bit for bit:
token embedding → rotary attention (bidirectional, or causal for the ``ar`` family) and a
GELU MLP in pre-norm blocks, adaLN-modulated by the time t when ``cond_dim`` > 0 (DiT) →
final norm → output layer. ``input_ids`` may hold the [MASK] id (``mask_token_id``) of a
masked-diffusion model; a time-conditioned model needs ``t`` (B,) in [0, 1].
``attention_mask`` (1 keep, 0 padding) hides padded keys.

A Gaussian embedding diffusion model (``input_width`` C > 0, dlm's ``VectorInputTransformer``)
reads vectors instead: ``inputs_embeds`` (B, T, C), the noisy state z_t (a float
``input_ids`` is taken as such), projected by ``in_proj`` (plus ``sc_proj`` of ``self_cond``
(B, T, C), the self-conditioning estimate, when ``self_condition``); ``model.process(ids)``
gives the clean unit-norm token embeddings e(x) that the state holds at clean positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class DlmConfig(PretrainedConfig):
    model_type = "dlm"

    def __init__(self, vocab_in=1, vocab_out=1, n_layer=1, n_head=1, d_model=8, causal=False, cond_dim=0,
                 mlp_ratio=4, rope_base=10000.0, dlm=None, input_width=0, self_condition=False, **kwargs):
        self.vocab_in, self.vocab_out = vocab_in, vocab_out
        self.input_width, self.self_condition = input_width, self_condition  # 0: token ids in (not vectors)
        self.n_layer, self.n_head, self.d_model = n_layer, n_head, d_model
        self.causal, self.cond_dim, self.mlp_ratio, self.rope_base = causal, cond_dim, mlp_ratio, rope_base
        self.dlm = dlm or {}  # what dlm needs to read the folder back: family, step, the run's config
        kwargs.setdefault("vocab_size", vocab_in)  # the embedding's rows ([MASK] included)
        super().__init__(**kwargs)


def _rotary(length, head_dim, base, device):
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq.to(device))
    return freqs.cos(), freqs.sin()  # (T, D/2)


def _apply_rotary(x, cos, sin):
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.causal = cfg.n_head, cfg.causal
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, attn_mask):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=self.causal and attn_mask is None)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=True)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=True)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


def _modulate(x, shift, scale):
    return x * (1 + scale) + shift


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model, bias=False)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.d_model, bias=False)
        self.mlp = MLP(cfg)
        self.ada = nn.Linear(cfg.cond_dim, 6 * cfg.d_model) if cfg.cond_dim else None

    def forward(self, x, c, cos, sin, attn_mask):
        if self.ada is None:
            x = x + self.attn(self.norm1(x), cos, sin, attn_mask)
            return x + self.mlp(self.norm2(x))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attn(_modulate(self.norm1(x), shift1, scale1), cos, sin, attn_mask)
        return x + gate2 * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class TimeEmbedding(nn.Module):
    def __init__(self, cond_dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
        args = 1000.0 * t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class TokenEmbeddings(nn.Module):
    """The Gaussian process's learned embeddings (V, C), used at unit norm (Plaid)."""

    def __init__(self, vocab, width):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(vocab, width))

    def forward(self, input_ids):
        e = self.embedding / self.embedding.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        return F.embedding(input_ids, e)


class DlmModel(PreTrainedModel):
    config_class = DlmConfig
    base_model_prefix = "dlm"
    _no_split_modules = ["Block"]

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_in, config.d_model)
        self.time = TimeEmbedding(config.cond_dim) if config.cond_dim else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = nn.LayerNorm(config.d_model, bias=False)
        self.final_ada = nn.Linear(config.cond_dim, 2 * config.d_model) if config.cond_dim else None
        self.head = nn.Linear(config.d_model, config.vocab_out, bias=True)
        if config.input_width:  # vectors in: the input projection(s) and the process's embeddings
            self.in_proj = nn.Linear(config.input_width, config.d_model, bias=True)
            self.sc_proj = nn.Linear(config.input_width, config.d_model, bias=False) if config.self_condition else None
            self.process = TokenEmbeddings(config.vocab_out, config.input_width)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def _attention_mask(self, attention_mask, T):
        if attention_mask is None:
            return None
        keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): attend to kept keys and to oneself
        mask = keys | torch.eye(T, dtype=torch.bool, device=keys.device)
        if self.config.causal:
            mask = mask & torch.ones(T, T, dtype=torch.bool, device=keys.device).tril()
        return mask

    def _input(self, input_ids, inputs_embeds, self_cond):
        """(B, T, d_model): the token embedding of ids, or the projection of the vector state."""
        if not self.config.input_width:
            return self.embed(input_ids)
        if inputs_embeds is None and input_ids is not None and input_ids.is_floating_point():
            inputs_embeds = input_ids
        z = self.process(input_ids) if inputs_embeds is None else inputs_embeds
        h = self.in_proj(z.to(self.in_proj.weight.dtype))
        if self_cond is not None:
            if self.sc_proj is None:
                raise ValueError("self_cond is for a self-conditioned model (self_condition in config.json)")
            h = h + self.sc_proj(self_cond.to(self.sc_proj.weight.dtype))
        return h

    def forward(self, input_ids=None, t=None, attention_mask=None, inputs_embeds=None, self_cond=None, **kwargs):
        """float32 logits (B, T, vocab_out) of ``input_ids`` (B, T) (or, for a vector-input
        model, ``inputs_embeds`` (B, T, C) and ``self_cond``), at time ``t`` (B,) if the model
        is time-conditioned."""
        cfg = self.config
        h = self._input(input_ids, inputs_embeds, self_cond)
        T = h.shape[1]
        cos, sin = _rotary(T, cfg.d_model // cfg.n_head, cfg.rope_base, h.device)
        c = None
        if self.time is not None:
            if t is None:
                raise ValueError("this model is time-conditioned: pass t (B,) in [0, 1]")
            c = F.silu(self.time(torch.as_tensor(t, device=h.device).expand(h.shape[0])))
        attn_mask = self._attention_mask(attention_mask, T)
        for block in self.blocks:
            h = block(h, c, cos, sin, attn_mask)
        h = self.norm(h)
        if self.final_ada is not None:
            shift, scale = self.final_ada(c)[:, None].chunk(2, dim=-1)
            h = _modulate(h, shift, scale)
        return CausalLMOutput(logits=self.head(h).float())
