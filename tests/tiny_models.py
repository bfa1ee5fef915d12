"""Tiny random-weight models for the unit tier."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase


def tiny_llama(tokenizer: PreTrainedTokenizerBase, seed: int = 0, training_length: int = 8192) -> PreTrainedModel:
    """A 2-layer random-weight Llama for ``tokenizer``'s vocabulary (a fresh one per call: tests that switch a model
    between strategies or patches take their own)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=training_length,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return LlamaForCausalLM(config).eval()
