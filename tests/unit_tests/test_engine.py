"""Engine and cache defects found in review, each pinned by a test that failed before its fix."""

from __future__ import annotations

import copy
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteriaList

from lminf_integrations import LMInfiniteConfig, new_cache, patch_model
from lminf_integrations.config import XL3MConfig
from lminf_integrations.engine import (
    Engine,
    GenerationSettings,
    StopWhen,
    cgroup_free_bytes,
    free_bytes,
    pad_token_id,
)
from lminf_integrations.hf_compat import cache_kwargs

Pair = tuple[PreTrainedModel, PreTrainedTokenizerBase]


def test_a_pad_token_id_of_zero_is_kept(tiny_llama_with_real_tokenizer: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer = tiny_llama_with_real_tokenizer
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id != 0
    assert pad_token_id(tokenizer) == 0
    seen: dict[str, object] = {}
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda *args, **kwargs: seen.update(kwargs) or generate(*args, **kwargs))
    engine = Engine(model=model, tokenizer=tokenizer, config=LMInfiniteConfig(n_local=16), reuse_prefixes=False)
    engine.generate("one two three", GenerationSettings(max_new_tokens=2))
    assert seen["pad_token_id"] == 0
    tokenizer.pad_token = None
    assert pad_token_id(tokenizer) == tokenizer.eos_token_id  # no pad token: EOS stands in, as before



def test_the_stop_criterion_answers_on_the_tokens_device() -> None:
    """transformers ORs each criterion's answer into a tensor on the tokens' device: an answer left on the CPU raises
    there when the tokens are on a GPU (here: on ``meta``, which mixes with the CPU no more than a GPU does)."""
    stop = [False]
    criteria = StoppingCriteriaList([StopWhen(lambda: stop[0])])
    ids = torch.zeros(2, 3, dtype=torch.long, device="meta")
    assert criteria(ids, torch.zeros(2, 5, device="meta")).device.type == "meta"
    ids = torch.zeros(2, 3, dtype=torch.long)
    assert criteria(ids, torch.zeros(2, 5)).tolist() == [False, False]
    stop[0] = True
    assert criteria(ids, torch.zeros(2, 5)).tolist() == [True, True]

@pytest.mark.parametrize("cache_mode", ["window", "full"])
@torch.no_grad()
def test_reset_clears_the_cache_in_place(tiny_llama_with_real_tokenizer: Pair, cache_mode: str) -> None:
    """Like transformers' cache layers: the same buffers, zeroed, and the cache then works as a new one."""
    model, _ = tiny_llama_with_real_tokenizer
    model = copy.deepcopy(model)
    patch_model(model, LMInfiniteConfig(n_global=2, n_local=8, cache_mode=cache_mode))  # type: ignore[arg-type]
    ids = torch.randint(100, 5000, (1, 30), generator=torch.Generator().manual_seed(0))
    cache = new_cache(model)
    model(ids[:, :20], **cache_kwargs(cache))
    for token in range(20, 24):
        model(ids[:, token : token + 1], **cache_kwargs(cache))
    layer = cache.lambda_layers[0]
    buffers, position = (layer.keys.data_ptr(), layer.values.data_ptr()), layer._position
    cache.reset()
    assert (layer.keys.data_ptr(), layer.values.data_ptr()) == buffers and layer._position is position
    assert not layer.keys.any() and not layer.values.any()
    assert cache.get_seq_length() == 0
    again = model(ids, **cache_kwargs(cache)).logits
    fresh = model(ids, **cache_kwargs(new_cache(model))).logits
    assert torch.equal(again, fresh)


def test_stream_with_an_encoded_document_reads_only_the_rest(tiny_llama_with_real_tokenizer: Pair) -> None:
    """``stream(text + question, state=encode_document(text))``, as documented, even where the tokenizer would merge
    tokens across the boundary ("Bob" + "by" tokenizes differently from "Bobby")."""
    model, tokenizer = tiny_llama_with_real_tokenizer
    engine = Engine(model=model, tokenizer=tokenizer, config=LMInfiniteConfig(n_local=16), reuse_prefixes=False)
    text, question = "Alice met Bob", "by the sea?"
    assert engine.tokenize(text + question)[: len(engine.tokenize(text))] != engine.tokenize(text)
    state = engine.encode_document(text)
    settings = GenerationSettings(max_new_tokens=4)
    stream = engine.stream(text + question, settings, state=state)
    answer = "".join(stream)
    assert stream.result is not None
    assert stream.result.input_tokens == len(engine.tokenize(text)) + len(engine.tokenize(question))
    # The same as giving the token ids of both halves, without the state.
    assert answer == "".join(engine.stream(engine.tokenize(text) + engine.tokenize(question), settings))
    with pytest.raises(ValueError, match="does not start with the encoded document"):
        engine.stream("Someone else entirely", settings, state=state)


def test_a_stream_left_early_still_reports_its_result(tiny_llama_with_real_tokenizer: Pair) -> None:
    """Leaving a stream after its first delta used to leave ``result`` None: counts (and a strategy's details,
    XL3M's selection) were lost for every consumer that stops early, as the benchmarks do."""
    model, tokenizer = tiny_llama_with_real_tokenizer
    engine = Engine(model=model, tokenizer=tokenizer, config=LMInfiniteConfig(n_local=16), reuse_prefixes=False)
    with engine.stream("one two three four", GenerationSettings(max_new_tokens=200)) as stream:
        for _ in stream:
            break
    assert stream.result is not None and stream.result.input_tokens == engine.count_tokens("one two three four")
    assert stream.result.stop_reason == "cancelled" and stream.result.output_tokens < 200


@pytest.mark.parametrize("strategy", ["lm-infinite", "xl3m", "vanilla"])
def test_all_model_work_of_every_engine_runs_on_one_thread(
    tiny_llama_with_real_tokenizer: Pair, strategy: str, tmp_path: Path
) -> None:
    """libgomp keeps an OpenMP team for every thread that has run parallel torch work, and once the teams hold more
    threads than there are cores it stops spinning between parallel regions: every team then sleeps and is woken
    for each one. Questions streamed after an in-process ``encode`` (the encode's team in the caller's thread, the
    stream's in another) ran markedly slower than after ``load_state`` (README, "One thread for the model").
    Encoding, saved states and every stream of every engine must share one thread, and not the caller's."""
    model, tokenizer = tiny_llama_with_real_tokenizer
    seen: set[int] = set()
    hook = model.get_decoder().layers[0].register_forward_pre_hook(lambda *_: seen.add(threading.get_ident()))
    try:
        settings = {"config": LMInfiniteConfig(n_local=16), "xl3m": XL3MConfig(segment_tokens=32, question_tokens=6)}
        engines = [
            Engine(model=model, tokenizer=tokenizer, strategy=strategy, reuse_prefixes=False, **settings)  # type: ignore[arg-type]
            for _ in range(2)
        ]
        text = " ".join(f"Fact {i}: the box number {i} is blue." for i in range(30))
        for engine in engines:
            state = engine.encode_document(text)
            engine.save_state(state, tmp_path / f"{strategy}.safetensors")
            loaded = engine.load_state(tmp_path / f"{strategy}.safetensors")
            loaded.text = text
            for question in (" Which box is blue?", " Which box is red?"):
                answer = "".join(engine.stream(text + question, GenerationSettings(max_new_tokens=3), state=loaded))
                assert isinstance(answer, str)
            engine.generate("one two three", GenerationSettings(max_new_tokens=2))
    finally:
        hook.remove()
    assert len(seen) == 1 and threading.get_ident() not in seen


def test_free_gpu_memory_counts_what_pytorch_holds_cached_but_unused(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a long prompt PyTorch keeps its blocks reserved for reuse; the driver reports them as used. A check
    that reads only the driver's free memory refuses a document that fits. (The GPU's readings are set here: no GPU
    in CI.)"""
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 30 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 20 * gib)
    assert free_bytes(torch.device("cuda:0")) == 12 * gib


def test_free_memory_follows_an_address_space_limit() -> None:
    """A process under ``ulimit -v`` (RLIMIT_AS) can map only what the limit leaves: the check must refuse a
    document by that, not by the machine's free memory, or encoding dies in torch's allocator."""
    probe = (
        "import resource, psutil, torch\n"
        "from lminf_integrations.engine import free_bytes\n"
        "used = psutil.Process().memory_info().vms\n"
        "resource.setrlimit(resource.RLIMIT_AS, (used + 2**30, resource.RLIM_INFINITY))\n"
        "print(free_bytes(torch.device('cpu')))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert 0 < int(done.stdout) <= 2**30


GIB = 2**30


@pytest.mark.parametrize(
    "membership,files,expected",
    [
        # cgroup v2: the limit less what is used, page cache that can be dropped not counted as used
        ("0::/\n", {"memory.max": f"{8 * GIB}\n", "memory.current": f"{3 * GIB}\n",
                     "memory.stat": f"anon 1\ninactive_file {GIB}\n"}, 6 * GIB),
        ("0::/\n", {"memory.max": "max\n", "memory.current": f"{3 * GIB}\n"}, None),
        # its own cgroup, seen without a cgroup namespace (a job scheduler's), and the tighter limit above it
        ("0::/a/b\n", {"memory.max": "max\n", "memory.current": "1\n",
                       "a/memory.max": f"{4 * GIB}\n", "a/memory.current": f"{3 * GIB}\n",
                       "a/b/memory.max": f"{8 * GIB}\n", "a/b/memory.current": f"{GIB}\n"}, GIB),
        # cgroup v1 (no limit reads as a huge number)
        ("4:memory:/\n", {"memory/memory.limit_in_bytes": f"{4 * GIB}\n", "memory/memory.usage_in_bytes": f"{GIB}\n",
                          "memory/memory.stat": "total_inactive_file 0\n"}, 3 * GIB),
        ("4:memory:/job/7\n", {"memory/memory.limit_in_bytes": "9223372036854771712\n",
                               "memory/memory.usage_in_bytes": "1\n",
                               "memory/job/7/memory.limit_in_bytes": f"{2 * GIB}\n",
                               "memory/job/7/memory.usage_in_bytes": f"{GIB}\n"}, GIB),
        ("4:memory:/\n", {"memory/memory.limit_in_bytes": "9223372036854771712\n",
                          "memory/memory.usage_in_bytes": "1\n"}, None),
        ("0::/\n", {}, None),
    ],
)  # fmt: skip
def test_a_container_memory_limit_bounds_the_free_memory(
    tmp_path: Path, membership: str, files: dict[str, str], expected: int | None
) -> None:
    """In a container or a scheduler's job, the cgroup's limit, not the host's free memory, is where the kernel
    kills the process."""
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (tmp_path / "membership").write_text(membership)
    assert cgroup_free_bytes(root, tmp_path / "membership") == expected


@pytest.fixture(scope="module")
def bos_tokenizer(default_tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The default tokenizer made to start every text with its BOS token, as Llama and Mistral tokenizers do."""
    tokenizer = copy.deepcopy(default_tokenizer)
    tokenizer.add_bos_token = True
    assert tokenizer("hi").input_ids[0] == tokenizer.bos_token_id
    return tokenizer


def test_a_plain_text_prompt_starts_with_the_tokenizers_bos_once(bos_tokenizer: PreTrainedTokenizerBase) -> None:
    """A text prompt is read as transformers' own pipelines read it: a tokenizer that starts texts with BOS gets
    it (a base Llama given a prompt without it answers worse); a text that already starts with it (a chat template
    that writes ``{{ bos_token }}``) is not given a second one; token ids are taken as they are."""
    from tests.tiny_models import tiny_llama

    engine = Engine(model=tiny_llama(bos_tokenizer), tokenizer=bos_tokenizer, reuse_prefixes=False)
    bos = bos_tokenizer.bos_token_id
    assert engine.prompt_ids("Alice met Bob") == [bos, *engine.tokenize("Alice met Bob")]
    assert engine.prompt_ids(bos_tokenizer.bos_token + "Alice met Bob") == [bos, *engine.tokenize("Alice met Bob")]
    assert engine.prompt_ids(engine.tokenize("Alice")) == engine.tokenize("Alice")
    text, question = "Alice met Bob", " by the sea?"
    state = engine.encode_document(text)
    assert state.token_ids == [bos, *engine.tokenize(text)]
    settings = GenerationSettings(max_new_tokens=4)
    stream = engine.stream(text + question, settings, state=state)
    assert "".join(stream) == engine.generate(text + question, settings)
    assert stream.result is not None and stream.result.input_tokens == len(engine.prompt_ids(text + question))


def test_a_tokenizer_without_bos_is_given_none(tiny_llama_with_real_tokenizer: Pair) -> None:
    model, tokenizer = tiny_llama_with_real_tokenizer
    engine = Engine(model=model, tokenizer=tokenizer, reuse_prefixes=False)
    assert engine.prompt_ids("Alice met Bob") == engine.tokenize("Alice met Bob")


THINKING_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)


def test_chat_template_arguments_reach_the_template(default_tokenizer: PreTrainedTokenizerBase) -> None:
    """``chat_template_kwargs`` are the template's own switches (Qwen3's ``enable_thinking``): every chat prompt is
    rendered with them, and XL3M still finds the template's closing part, however much they add to it."""
    from lminf_integrations.strategies.xl3m.strategy import template_parts
    from tests.tiny_models import tiny_llama

    tokenizer = copy.deepcopy(default_tokenizer)
    tokenizer.chat_template = THINKING_TEMPLATE
    model = tiny_llama(tokenizer)
    messages = [{"role": "user", "content": "Alice met Bob. Who did Alice meet?"}]
    thinking = Engine(model=model, tokenizer=tokenizer, reuse_prefixes=False)
    assert thinking.chat_prompt(messages).endswith("<|im_start|>assistant\n")
    quiet = Engine(model=model, tokenizer=tokenizer, chat_template_kwargs={"enable_thinking": False},
                   reuse_prefixes=False)  # fmt: skip
    prompt = quiet.chat_prompt(messages)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert quiet.options.chat_template_kwargs == {"enable_thinking": False}
    ids = quiet.tokenize(prompt)
    parts = template_parts(tokenizer, ids)
    closing = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert tokenizer.decode(ids[len(ids) - parts.tail :]) == closing
    with pytest.raises(ValueError, match="chat_template_kwargs must be"):
        Engine(model=model, tokenizer=tokenizer, chat_template_kwargs="enable_thinking")  # type: ignore[arg-type]
