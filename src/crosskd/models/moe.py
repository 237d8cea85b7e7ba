"""Mixture-of-experts teachers: detection, router logits and how evenly the experts are used.

A collapsed router (every token sent to the same experts) is a sign of a broken or badly quantised MoE teacher;
`expert_usage_entropy` measures it per layer: 1.0 means all experts are chosen equally often, 0.0 means one expert
takes every choice.
"""

from __future__ import annotations

import math

import torch

MOE_MODEL_TYPES = frozenset({"qwen2_moe", "qwen3_moe", "mixtral"})


def is_moe_config(config) -> bool:
    """True for a known MoE architecture or any config that declares experts (num_experts / num_local_experts)."""
    if getattr(config, "model_type", None) in MOE_MODEL_TYPES:
        return True
    return any((getattr(config, name, None) or 0) > 1 for name in ("num_experts", "num_local_experts"))


@torch.no_grad()
def router_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """One [batch*seq, num_experts] tensor of router logits per MoE layer, from a forward pass of an MoE model."""
    if not is_moe_config(model.config):
        raise ValueError(f"{type(model).__name__} ({model.config.model_type}) is not a mixture-of-experts model")
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True)
    if not outputs.router_logits:
        raise ValueError(f"{type(model).__name__} returned no router logits although output_router_logits=True")
    return tuple(outputs.router_logits)


def expert_usage_entropy(
    router_logits: tuple[torch.Tensor, ...] | list[torch.Tensor], top_k: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-layer entropy of expert usage, normalised by log(num_experts): float [num_layers] in [0, 1].

    Usage counts the experts each token is actually routed to (its top_k router logits). `token_mask` (bool, any
    shape with batch*seq elements, e.g. the attention mask) leaves padding tokens out.
    """
    entropies = []
    for layer_logits in router_logits:
        num_experts = layer_logits.shape[-1]
        if num_experts < 2:
            raise ValueError(f"expert usage entropy needs at least two experts, the router has {num_experts}")
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k must be in 1..{num_experts} (the number of experts), got {top_k}")
        logits = layer_logits.reshape(-1, num_experts).float()
        if token_mask is not None:
            logits = logits[token_mask.reshape(-1).to(torch.bool)]
        chosen = logits.topk(top_k, dim=-1).indices.reshape(-1)
        usage = torch.bincount(chosen, minlength=num_experts).float()
        usage = usage / usage.sum().clamp_min(1.0)
        entropy = -(usage * usage.clamp_min(1e-30).log()).sum()
        entropies.append(entropy / math.log(num_experts))
    return torch.stack(entropies)
