"""Λ-attention exactness on tiny random-weight models of every supported architecture.

(a) equal to the unpatched model while the input fits the window; (b) equal to an independent dense reference
(``reference.py``) on inputs >= 3 × n_local, in both cache modes, with and without top-k; (c) token-by-token
decoding with the cache equals recomputing the whole sequence; (d) the window cache stays the same size.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from lminf_integrations import LMInfiniteConfig, new_cache, patch_model, unpatch_model
from lminf_integrations.hf_compat import cache_kwargs
from lminf_integrations.ops import decode_kernel
from lminf_integrations.strategies.lm_infinite import attention
from tests.tolerances import assert_close, network_bound

from . import reference

VOCAB = 101
# The longest sum in these models' layers (MLP width 128; hidden 96, at most 41 keys) and their depth; with the
# lm head, the error passes through 4 reductions in a row.
REDUCTION, LAYERS = 128, 4


def _tolerance(expected: torch.Tensor) -> float:
    return network_bound(expected, torch.float32, REDUCTION, LAYERS)


def _close(got: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Equal up to float32 rounding in another order (``tests/tolerances.py``)."""
    assert_close(got, expected, _tolerance(expected), what)


def _common() -> dict[str, object]:
    return dict(
        vocab_size=VOCAB,
        hidden_size=96,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,  # grouped-query attention: 3 query heads per kv head
        max_position_embeddings=64,
    )


def _tiny(arch: str) -> PreTrainedModel:
    torch.manual_seed(1234)
    if arch == "llama":
        model: PreTrainedModel = LlamaForCausalLM(LlamaConfig(**_common()))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**_common(), sliding_window=None))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**_common()))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**_common(), head_dim=16))
    return model.eval()


ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3"]


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (1, n), generator=generator)


def _reference_logits(model: PreTrainedModel, ids: torch.Tensor, top_k_from: int | None) -> torch.Tensor:
    reference.TOP_K_FROM_POSITION[0] = top_k_from
    previous = model.config._attn_implementation
    model.set_attn_implementation(reference.REFERENCE_NAME)
    try:
        return model(ids).logits
    finally:
        model.set_attn_implementation(previous)


def _chunked_logits(model: PreTrainedModel, ids: torch.Tensor, chunk: int, prompt_length: int) -> torch.Tensor:
    """Prefill in chunks through the LM-Infinite cache (the last prompt token alone, as generation does)."""
    cache = new_cache(model)
    cache.set_prompt_length(prompt_length)
    pieces = []
    bounds = list(range(0, prompt_length - 1, chunk)) + [prompt_length - 1]
    for start, end in zip(bounds, bounds[1:] + [prompt_length], strict=True):
        pieces.append(model(ids[:, start:end], **cache_kwargs(cache)).logits)
    for position in range(prompt_length, ids.shape[1]):
        pieces.append(model(ids[:, position : position + 1], **cache_kwargs(cache)).logits)
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@torch.no_grad()
def test_equals_unpatched_within_window(arch: str) -> None:
    model = _tiny(arch)
    ids = _ids(32)
    vanilla = model(ids).logits
    patch_model(model, LMInfiniteConfig(n_global=4, n_local=32, chunk_size=8))
    _close(model(ids).logits, vanilla)
    _close(_chunked_logits(model, ids, chunk=7, prompt_length=32), vanilla)
    unpatch_model(model)
    assert (model(ids).logits - vanilla).abs().max() == 0


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize(
    "cache,top_k,distance_limit",
    [("window", 0, None), ("window", 0, 5), ("full", 0, 6), ("full", 3, None), ("full", 2, 5)],
)
@torch.no_grad()
def test_long_input_equals_naive_reference(arch: str, cache: str, top_k: int, distance_limit: int | None) -> None:
    model = _tiny(arch)
    config = LMInfiniteConfig(
        n_global=3, n_local=8, distance_limit=distance_limit, top_k=top_k, top_k_from_layer=1, cache_mode=cache  # type: ignore[arg-type]
    )
    patch_model(model, config)
    prompt_length, total = 30, 36  # prompt >= 3 × n_local, then 6 "generated" tokens
    ids = _ids(total, seed=1)
    expected_prompt = _reference_logits(model, ids[:, :prompt_length], top_k_from=prompt_length - 1)
    got = _chunked_logits(model, ids, chunk=5, prompt_length=prompt_length)
    _close(got[:, :prompt_length], expected_prompt)
    # Every later position is a generation-time query: compare each with a fresh reference run.
    for position in range(prompt_length, total):
        expected = _reference_logits(model, ids[:, : position + 1], top_k_from=prompt_length - 1)[:, -1]
        _close(got[:, position], expected, what=f"{position}")


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("cache,top_k", [("window", 0), ("full", 2)])
@torch.no_grad()
def test_many_band_blocks_equal_reference(arch: str, cache: str, top_k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks split into several query blocks (the last one partial), whose keys are an unmasked interior plus
    masked edges, with the window at the start not yet full, on a batch of two sequences."""
    monkeypatch.setattr(attention, "BLOCK", 3)
    model = _tiny(arch)
    patch_model(model, LMInfiniteConfig(n_global=2, n_local=8, top_k=top_k, top_k_from_layer=1, cache_mode=cache))  # type: ignore[arg-type]
    ids = torch.cat([_ids(40, seed=3), _ids(40, seed=4)])
    expected = _reference_logits(model, ids, top_k_from=39)
    got = _chunked_logits(model, ids, chunk=13, prompt_length=40)
    _close(got[:, :39], expected[:, :39])
    _close(got[:, -1], expected[:, -1])


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("cache,top_k", [("window", 0), ("full", 2)])
@torch.no_grad()
def test_chunks_shorter_than_the_window_split_into_core_and_inner_band_equal_reference(
    arch: str, cache: str, top_k: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks well below the window (a prefill's usual case): the keys every query sees in one call, the rest as
    a narrower band of several blocks (the last one partial), on a batch of two sequences."""
    monkeypatch.setattr(attention, "BLOCK", 2)
    split_calls = []
    original = attention._core_and_inner_band
    monkeypatch.setattr(
        attention, "_core_and_inner_band", lambda *args: split_calls.append(args[0].shape[-2]) or original(*args)
    )
    model = _tiny(arch)
    patch_model(model, LMInfiniteConfig(n_global=2, n_local=12, top_k=top_k, top_k_from_layer=1, cache_mode=cache))  # type: ignore[arg-type]
    ids = torch.cat([_ids(41, seed=6), _ids(41, seed=7)])
    expected = _reference_logits(model, ids, top_k_from=40)
    got = _chunked_logits(model, ids, chunk=5, prompt_length=41)
    _close(got[:, :40], expected[:, :40])
    _close(got[:, -1], expected[:, -1])
    assert 5 in split_calls  # the split path really ran (chunks from position 11 on)


@pytest.mark.parametrize("cache", ["window", "full"])
@torch.no_grad()
def test_chunks_starting_anywhere_near_the_window_edge_equal_reference(cache: str) -> None:
    """A chunk may start just before, at, or after the point where the global keys leave every query's window."""
    model = _tiny("llama")
    patch_model(model, LMInfiniteConfig(n_global=3, n_local=8, cache_mode=cache))  # type: ignore[arg-type]
    ids = _ids(30, seed=5)
    expected = _reference_logits(model, ids, top_k_from=None)
    for split in range(4, 16):
        cache_ = new_cache(model)
        bounds = [0, split, split + 9, 30]
        pieces = [model(ids[:, a:b], **cache_kwargs(cache_)).logits for a, b in zip(bounds, bounds[1:], strict=False)]
        got = torch.cat(pieces, dim=1)
        _close(got, expected, what=f"{split}")


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("top_k", [0, 2])
@torch.no_grad()
def test_whole_sequence_forward_without_cache_equals_reference(arch: str, top_k: int) -> None:
    """One forward over the whole sequence: with top-k, only its last query is a generation-time query."""
    model = _tiny(arch)
    cache = "full" if top_k else "window"
    patch_model(model, LMInfiniteConfig(n_global=2, n_local=8, top_k=top_k, top_k_from_layer=1, cache_mode=cache))
    ids = _ids(40, seed=2)
    _close(model(ids).logits, _reference_logits(model, ids, top_k_from=None))


@pytest.mark.parametrize("cache", ["window", "full"])
@pytest.mark.parametrize("kernel", ["decode kernel", "flash kernel"])
@torch.no_grad()
def test_decoding_with_cache_equals_recomputation(cache: str, kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Steady window steps go through the decoding kernel (decode_kernel.py) unless it is turned off.
    calls = []
    built = decode_kernel.decode_attention_op()
    assert built is not None
    monkeypatch.setattr(decode_kernel, "decode_attention_op", lambda: lambda *args: calls.append(1) or built(*args))
    monkeypatch.setenv("LMINF_DECODE_KERNEL", "1" if kernel == "decode kernel" else "0")
    model = _tiny("llama")
    patch_model(model, LMInfiniteConfig(n_global=2, n_local=8, cache_mode=cache, chunk_size=4))  # type: ignore[arg-type]
    ids = _ids(20, seed=3)
    kv = new_cache(model)
    model(ids[:, :-1], **cache_kwargs(kv))
    step = model(ids[:, -1:], **cache_kwargs(kv)).logits[:, -1]
    for _ in range(15):
        token = step.argmax(-1, keepdim=True)
        ids = torch.cat([ids, token], dim=1)
        step = model(token, **cache_kwargs(kv)).logits[:, -1]
        recomputed = model(ids).logits[:, -1]  # no cache at all: the whole sequence again
        _close(step, recomputed)
    # 16 single-token steps (the last prompt token, then 15), 3 layers each
    steady_window_steps = 16 * 3 if cache == "window" and kernel == "decode kernel" else 0
    assert len(calls) == steady_window_steps


@torch.no_grad()
def test_an_eager_decoding_step_or_chunk_reads_no_tensor_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading a GPU tensor's value in Python waits for every kernel queued before it, so an eager decoding step that
    read one (the position, per layer or for transformers' sequence length) could not queue work ahead of the GPU.
    The window cache counts eager steps on the host. Counted here on the CPU through the path a GPU takes
    (``ops.flex``), as the reads behind ``int()`` and ``.item()`` (``aten::_local_scalar_dense``): decoding steps
    past the window's filling, then a prompt chunk of a shape seen before (a new shape builds its block mask once),
    with logits equal to a recomputation without cache."""
    from lminf_integrations.ops import flex, partial

    monkeypatch.setattr(flex, "FLEX_ON_CPU", True)
    monkeypatch.setattr(partial, "PLAIN_ON_CPU", True)
    model = _tiny("llama")
    patch_model(model, LMInfiniteConfig(n_global=2, n_local=8, cache_mode="window", chunk_size=4))
    ids = _ids(30, seed=4)
    kv = new_cache(model)
    for start in range(0, 20, 4):
        model(ids[:, start : start + 4], **cache_kwargs(kv))

    def reads(step: Callable[..., object], *args: object) -> int:
        with torch.profiler.profile() as profile:
            step(*args)
        return sum(e.name == "aten::_local_scalar_dense" for e in profile.events())

    def forward(start: int, end: int) -> None:
        logits[:] = [model(ids[:, start:end], **cache_kwargs(kv)).logits]

    logits: list[torch.Tensor] = []
    assert reads(int, torch.tensor(3)) == 1  # the count sees a read
    assert [reads(forward, position, position + 1) for position in range(20, 26)] == [0] * 6
    assert reads(forward, 26, 30) == 0
    assert kv.get_seq_length() == 30
    _close(logits[0][:, -1], model(ids).logits[:, -1])


@torch.no_grad()
def test_window_cache_size_is_constant_over_long_decode() -> None:
    model = _tiny("llama")
    patch_model(model, LMInfiniteConfig(n_global=2, n_local=8, cache_mode="window"))
    kv = new_cache(model)
    model(_ids(8), **cache_kwargs(kv))
    sizes = set()
    token = torch.tensor([[5]])
    for _ in range(100):
        model(token, **cache_kwargs(kv))
        sizes.add(kv.nbytes())
    assert len(sizes) == 1
    assert kv.get_seq_length() == 108


@torch.no_grad()
def test_full_cache_grows_and_reports_size() -> None:
    model = _tiny("llama")
    patch_model(model, LMInfiniteConfig(n_global=2, n_local=8, cache_mode="full"))
    kv = new_cache(model)
    model(_ids(300), **cache_kwargs(kv))
    small = kv.nbytes()
    model(_ids(2700), **cache_kwargs(kv))
    assert kv.nbytes() > small
    assert kv.get_seq_length() == 3000
    # Growth leaves at most a quarter (or 1024 slots) unused: bytes per slot × slots held.
    per_slot = small / 1280  # the first allocation held 256 + 1024 slots
    assert kv.nbytes() <= per_slot * (3000 + max(3000 // 4, 1024)) + 1
    # A clone keeps room for a question and an answer, and shares nothing with the original.
    twin = kv.clone()
    assert twin.get_seq_length() == 3000 and twin.nbytes() <= per_slot * (3000 + 1024) + 1
    model(_ids(5), **cache_kwargs(twin))
    assert twin.get_seq_length() == 3005 and kv.get_seq_length() == 3000


@torch.no_grad()
def test_generate_works_with_both_caches_and_streamers() -> None:
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        """Every id generate() streams: the prompt first, then one new token per step."""

        def __init__(self) -> None:
            self.puts: list[list[int]] = []
            self.ended = False

        def put(self, value: torch.Tensor) -> None:
            self.puts.append(value.flatten().tolist())

        def end(self) -> None:
            self.ended = True

    model = _tiny("llama")
    patch_model(model, LMInfiniteConfig(n_global=2, n_local=8))
    ids = _ids(30, seed=4)
    with_default_cache = model.generate(ids, max_new_tokens=12, do_sample=False)
    streamer = Collect()
    with_lambda_cache = model.generate(
        ids, max_new_tokens=12, do_sample=False, **cache_kwargs(new_cache(model)), streamer=streamer
    )
    assert torch.equal(with_default_cache, with_lambda_cache)
    assert streamer.ended and streamer.puts[0] == ids[0].tolist()
    assert sum(streamer.puts[1:], []) == with_lambda_cache[0, 30:].tolist()  # each new token, streamed in order
    sampled = model.generate(
        ids, max_new_tokens=5, do_sample=True, top_p=0.9, **cache_kwargs(new_cache(model)), pad_token_id=0
    )
    assert sampled.shape == (1, 35)


def test_unsupported_architecture_names_the_supported_ones() -> None:
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50))
    with pytest.raises(ValueError, match="llama, mistral, qwen2, qwen3"):
        patch_model(model, LMInfiniteConfig())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"n_local": 0}, "n_local"),
        ({"n_global": -1}, "n_global"),
        ({"top_k": 4}, "cache_mode='full'"),
        ({"cache_mode": "paged"}, "cache_mode must be"),
        ({"distance_limit": 0}, "distance_limit"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_config_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LMInfiniteConfig(**kwargs)  # type: ignore[arg-type]


def test_settings_beyond_training_length_are_refused() -> None:
    model = _tiny("llama")  # trained length 64
    with pytest.raises(ValueError, match="training length"):
        patch_model(model, LMInfiniteConfig(n_local=128))
    with pytest.raises(ValueError, match="top_k_from_layer"):
        patch_model(model, LMInfiniteConfig(n_local=8, cache_mode="full", top_k=2, top_k_from_layer=3))


@torch.no_grad()
def test_padded_batches_are_refused_clearly() -> None:
    model = _tiny("llama")
    patch_model(model, LMInfiniteConfig(n_local=8))
    ids = _ids(10).repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with pytest.raises(ValueError, match="padded"):
        model(ids, attention_mask=mask)
    # Equal-length batches are fine and match single runs.
    batch = model(torch.cat([_ids(20, 1), _ids(20, 2)])).logits
    _close(batch[1], model(_ids(20, 2)).logits[0])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@torch.inference_mode()  # the engine encodes under inference mode; its cache tensors must stay there
def test_engine_prefill_keeps_top_k_for_generation_time_queries(arch: str) -> None:
    """The engine encodes a prompt in chunks and generates from its last token: top-k must apply to that last
    token only, never to the prefill queries (that would change every later key and cost O(n²))."""
    from types import SimpleNamespace

    from lminf_integrations.engine import Engine

    model = _tiny(arch)
    config = LMInfiniteConfig(n_global=3, n_local=8, top_k=2, top_k_from_layer=1, cache_mode="full", chunk_size=5)
    engine = Engine(model=model, tokenizer=SimpleNamespace(), config=config, reuse_prefixes=False)  # type: ignore[arg-type]
    prompt_length = 30
    ids = _ids(prompt_length, seed=3)
    state = engine.encode(ids[0, :-1].tolist())
    state.cache.set_prompt_length(prompt_length)  # as Engine._generate does before generation
    got = model(ids[:, -1:], **cache_kwargs(state.cache)).logits[:, -1]
    expected = _reference_logits(model, ids, top_k_from=prompt_length - 1)[:, -1]
    _close(got, expected)
    without_top_k = _reference_logits(model, ids, top_k_from=prompt_length)[:, -1]  # no query reaches it
    assert (got - without_top_k).abs().max() > 10 * _tolerance(expected)  # top-k did change the last token


def _qkv(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random query, key and value states of ``_tiny``'s shapes for ``n`` positions: (1, heads, n, head_dim)."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 6, n, 16, generator=generator)
    return q, torch.randn(1, 2, n, 16, generator=generator), torch.randn(1, 2, n, 16, generator=generator)


@torch.no_grad()
def test_keys_the_cache_handed_over_but_the_attention_did_not_get_are_an_error() -> None:
    """A LambdaCache update hands its keys to the attention call right after it; if that call gets other keys,
    something in between changed them, and deriving everything from those keys as if there were no cache would be
    silently wrong."""
    model = _tiny("llama")
    patch_model(model, LMInfiniteConfig(n_global=2, n_local=8))
    module = model.model.layers[0].self_attn
    query, key, value = _qkv(5)
    keys, values = new_cache(model).update(key, value, 0)
    with pytest.raises(RuntimeError, match="did not get"):
        attention.lambda_attention(module, query, keys.clone(), values, None)


@pytest.mark.parametrize("cache", ["window", "full"])
@torch.no_grad()
def test_an_architecture_changing_the_keys_after_the_cache_update_is_refused(
    cache: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model whose attention code does something to the keys between the cache update and the attention call
    (here: copies them) is refused, rather than answered from positions 0..n of a cache window."""
    from lminf_integrations.strategies.lm_infinite.cache import LambdaLayer

    update = LambdaLayer.update

    def copying_update(self: LambdaLayer, *args: object, **kwargs: object) -> tuple[torch.Tensor, ...]:
        return tuple(t.clone() for t in update(self, *args, **kwargs))  # type: ignore[arg-type]

    monkeypatch.setattr(LambdaLayer, "update", copying_update)
    model = _tiny("llama")
    patch_model(model, LMInfiniteConfig(n_global=2, n_local=8, cache_mode=cache))  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="did not get"):
        model(_ids(12), **cache_kwargs(new_cache(model)))


@torch.no_grad()
def test_a_hand_off_left_by_a_failed_forward_does_not_reach_the_next_one() -> None:
    """Without a LambdaCache (no cache, or transformers' own) the attention derives everything from the keys; a
    hand-off some earlier forward left behind (it failed between the cache update and the attention call) must
    not be taken for this forward's."""
    model = _tiny("llama")
    patch_model(model, LMInfiniteConfig(n_global=2, n_local=8))
    ids = _ids(12, seed=8)
    expected = model(ids).logits
    _, key, value = _qkv(12)
    new_cache(model).update(key, value, 0)  # its attention call never comes
    _close(model(ids).logits, expected)
    padded = _ids(12).repeat(2, 1)
    mask = torch.ones_like(padded)
    mask[1, :3] = 0
    with pytest.raises(ValueError, match="padded"):  # refused in the attention call, after the update
        model(padded, attention_mask=mask, **cache_kwargs(new_cache(model)))
    _close(model(ids).logits, expected)
