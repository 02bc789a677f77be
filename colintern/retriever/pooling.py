"""Single-vector retrieval (docs/CONTRACT.md §11): pooling the kept token states into one vector, and the
language model's attention direction.

- `pool(hidden, keep, mode, pooler)`: "last" (the last kept token: with right padding the last real one),
  "mean" (masked mean), "latent" (NV-Embed latent attention, `LatentAttentionPooler`).
- `set_text_attention(lm, attention)`: "causal" (as the checkpoint was pretrained) or "bidirectional" (every token
  sees every other real token). In transformers 5.x this is the text config's `is_causal`, which both the mask
  builder and the attention kernels read; passing `is_causal=False` to the backbone's forward instead would reach
  Qwen3-VL's vision tower and crash. Padding stays masked either way, so an item never depends on its batch.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from colintern.retriever.config import ATTENTIONS, POOLINGS

LATENT_DEFAULTS = {"num_latents": 512, "heads": 8, "dim_head": 0, "mlp_mult": 4}  # NV-Embed; dim_head 0 = hidden


class LatentAttentionPooler(nn.Module):
    """NV-Embed latent-attention pooling: each token state (query) attends to a trainable latent array (keys =
    values), then a GELU MLP, both residual, then a masked mean over the kept tokens. Tokens never attend to each
    other here, so a padded position cannot leak into a real one. Deterministic init from `seed`; fp32."""

    def __init__(self, hidden: int, num_latents: int = 512, heads: int = 8, dim_head: int = 0, mlp_mult: int = 4,
                 seed: int = 0):
        super().__init__()
        dim_head = dim_head or hidden
        self.heads, self.dim_head = heads, dim_head
        self.norm_tokens = nn.LayerNorm(hidden)
        self.norm_latents = nn.LayerNorm(hidden)
        self.norm_mlp = nn.LayerNorm(hidden)
        self.latents = nn.Parameter(torch.empty(num_latents, hidden))  # (r, H)
        self.to_q = nn.Linear(hidden, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(hidden, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_mult * hidden), nn.GELU(), nn.Linear(mlp_mult * hidden, hidden))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.latents.normal_(generator=generator)
            layers: tuple[Any, ...] = (self.to_q, self.to_kv, self.to_out, self.mlp[0], self.mlp[2])
            for layer in layers:  # nn.Linear each
                bound = layer.in_features ** -0.5
                layer.weight.uniform_(-bound, bound, generator=generator)
                if layer.bias is not None:
                    layer.bias.zero_()

    def forward(self, hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """(B, L, H) token states, (B, L) kept tokens -> (B, H)."""
        b, length, _ = hidden.shape
        q = self.to_q(self.norm_tokens(hidden)).view(b, length, self.heads, self.dim_head).transpose(1, 2)
        k, v = self.to_kv(self.norm_latents(self.latents)).chunk(2, dim=-1)  # (r, heads * dh) each
        k = k.view(-1, self.heads, self.dim_head).transpose(0, 1).expand(b, -1, -1, -1)  # (B, heads, r, dh)
        v = v.view(-1, self.heads, self.dim_head).transpose(0, 1).expand(b, -1, -1, -1)
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # (B, heads, L, dh)
        hidden = hidden + self.to_out(attended.transpose(1, 2).reshape(b, length, -1))
        hidden = hidden + self.mlp(self.norm_mlp(hidden))
        return masked_mean(hidden, keep)


def masked_mean(hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, L, H), (B, L) -> (B, H): the mean of the kept positions (zeros for a row with none)."""
    weights = keep.to(hidden.dtype).unsqueeze(-1)  # (B, L, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def last_kept(hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, L, H), (B, L) -> (B, H): the state of each row's last kept position."""
    positions = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)  # (B, L)
    last = torch.where(keep.bool(), positions, -1).max(dim=1).values.clamp_min(0)  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def pool(hidden: torch.Tensor, keep: torch.Tensor, mode: str, pooler: nn.Module | None = None) -> torch.Tensor:
    """One vector per item: (B, L, H) float32 token states and their (B, L) keep mask -> (B, H)."""
    if mode == "last":
        return last_kept(hidden, keep)
    if mode == "mean":
        return masked_mean(hidden, keep)
    if mode == "latent":
        if pooler is None:
            raise ValueError("pooling 'latent' needs its pooler")
        return pooler(hidden, keep)
    raise ValueError(f"unknown pooling {mode!r}; expected one of {POOLINGS}")


def set_text_attention(lm: nn.Module, attention: str) -> None:
    """Make the language model `lm` attend causally or bidirectionally (its config and every attention layer)."""
    if attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {attention!r}; expected one of {ATTENTIONS}")
    causal = attention == "causal"
    config: Any = lm.config
    if causal:
        vars(config).pop("is_causal", None)  # back to the class default, no stale override
    else:
        config.is_causal = False  # read by the mask builder and injected into the attention kernels
    layers: list[Any] = [m for m in lm.modules() if m is not lm and hasattr(m, "is_causal")]
    if len(layers) != config.num_hidden_layers:  # guards against transformers changing the layout
        raise RuntimeError(f"expected {config.num_hidden_layers} decoder attention modules with is_causal, "
                           f"found {len(layers)}")
    for module in layers:
        module.is_causal = causal


def latent_settings(values: dict[str, Any]) -> dict[str, Any]:
    """The latent pooler's sizes: NV-Embed's defaults overridden by `values` (a config's `latent` field)."""
    unknown = sorted(set(values) - set(LATENT_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown latent pooler settings {unknown}; known: {sorted(LATENT_DEFAULTS)}")
    return {**LATENT_DEFAULTS, **values}
