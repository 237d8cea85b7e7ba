"""What a model's memory is made of, read from its config alone (no weight is loaded).

Parameter counts come from the model built on the meta device (every architecture transformers knows, tied weights
counted once); the bytes a decoder layer keeps for backward come from the config's shapes. `crosskd plan` builds a
training step's memory from these facts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crosskd.models.loading import load_pretrained, resolve_spec

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FLOAT32_BYTES = 4


class ArchitectureError(ValueError):
    """A model config the planner cannot read shapes from: the message names the missing field."""


@dataclass(frozen=True)
class ArchitectureFacts:
    spec: str
    model_type: str
    parameters: int  # distinct parameters: tied input and output embeddings count once
    output_embedding_parameters: int  # the LM head [V, H]; for a tied model the same tensor as the input embedding
    input_embedding_parameters: int  # 0 when tied to the output embedding (already counted there)
    layer_parameters: int  # one decoder layer
    layers: int
    hidden_size: int
    intermediate_size: int
    attention_heads: int
    key_value_heads: int
    head_dim: int
    logit_size: int  # rows of the output layer (padded ids included)

    @property
    def key_value_size(self) -> int:
        return self.key_value_heads * self.head_dim

    def layer_saved_bytes_per_token(self, activation_bytes: int) -> int:
        """Bytes one decoder layer keeps for backward per token, for a pre-norm decoder with RMSNorm, SDPA attention
        and a gated MLP (Llama, Qwen2, Mistral, SmolLM): the tensors autograd saves, op by op.

        - each of the two RMSNorms computes in float32 and keeps its float32 input and normalised value;
        - the projections keep their inputs: in float32 q/k/v share one, o reads the attention output, gate/up share
          one (3 x H); under 16-bit autocast each projection keeps its own cast copy (q, k, v, gate, up) and o the
          attention output (6 x H);
        - SDPA keeps query [H], key and value [kv] (grouped-query attention without repeating them), the output (o's
          input, above) and a float32 log-sum-exp per head;
        - the MLP keeps gate, silu(gate), up and their product (4 x I).
        """
        hidden, kv, intermediate = self.hidden_size, self.key_value_size, self.intermediate_size
        norms = 2 * 2 * hidden * FLOAT32_BYTES
        if activation_bytes == FLOAT32_BYTES:
            projection_inputs = 3 * hidden * FLOAT32_BYTES
        else:
            projection_inputs = 6 * hidden * activation_bytes
        attention = (hidden + 2 * kv) * activation_bytes + self.attention_heads * FLOAT32_BYTES
        mlp = 4 * intermediate * activation_bytes
        return norms + projection_inputs + attention + mlp

    def final_norm_saved_bytes_per_token(self) -> int:
        return 2 * self.hidden_size * FLOAT32_BYTES

    def forward_working_bytes_per_token(self, activation_bytes: int) -> int:
        """Bytes alive per token inside one layer of a forward without gradients: the residual stream, the normed
        input, q/k/v, the attention output and the MLP's gate, up and product."""
        return (4 * self.hidden_size + 2 * self.key_value_size + 3 * self.intermediate_size) * activation_bytes


def _field(config, names: tuple[str, ...], spec: str):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    raise ArchitectureError(f"the config of {spec!r} ({config.model_type}) has no {' / '.join(names)}: the planner "
                            "reads a decoder's shapes from it; plan with a decoder-only model config "
                            "(Llama, Qwen2, Mistral, ...)")


def architecture_facts(spec: str) -> ArchitectureFacts:
    """The facts of the model `spec` names (a spec as `load_model` takes it), from its config on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source = resolve_spec(spec)
    config = load_pretrained(AutoConfig, source)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = _field(config, ("hidden_size", "n_embd", "d_model"), spec)
    layers = _field(config, ("num_hidden_layers", "n_layer"), spec)
    heads = _field(config, ("num_attention_heads", "n_head"), spec)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    intermediate = _field(config, ("intermediate_size", "n_inner", "ffn_dim"), spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    output = model.get_output_embeddings().weight
    input_weight = model.get_input_embeddings().weight
    tied = input_weight is output
    decoder_layers = model.base_model.layers if hasattr(model.base_model, "layers") else None
    if decoder_layers is None or len(decoder_layers) != layers:
        raise ArchitectureError(f"{spec!r} ({config.model_type}) does not keep its {layers} decoder layers in "
                                "`model.layers`; the planner knows the layer layout of Llama-style decoders only")
    return ArchitectureFacts(
        spec=spec,
        model_type=config.model_type,
        parameters=sum(p.numel() for p in model.parameters()),
        output_embedding_parameters=output.numel(),
        input_embedding_parameters=0 if tied else input_weight.numel(),
        layer_parameters=sum(p.numel() for p in decoder_layers[0].parameters()),
        layers=layers,
        hidden_size=hidden,
        intermediate_size=intermediate,
        attention_heads=heads,
        key_value_heads=kv_heads,
        head_dim=head_dim,
        logit_size=output.shape[0],
    )
