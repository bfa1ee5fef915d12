"""CPU-specific choices (``cpu.py``): eager bf16 decoding steps run with oneDNN off, and the flag comes back."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lminf_integrations import LMInfiniteConfig, cpu
from lminf_integrations.engine import Engine, GenerationSettings


def test_decoding_without_onednn_is_for_bf16_on_a_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    here = torch.device("cpu")
    assert cpu.decodes_faster_without_onednn(torch.bfloat16, here)
    assert not cpu.decodes_faster_without_onednn(torch.float32, here)
    assert not cpu.decodes_faster_without_onednn(torch.bfloat16, torch.device("meta"))
    monkeypatch.setenv("LMINF_DECODE_ONEDNN", "1")
    assert not cpu.decodes_faster_without_onednn(torch.bfloat16, here)


def test_onednn_comes_back_after_overlapping_users_in_threads() -> None:
    assert torch.backends.mkldnn.enabled
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: list[bool] = []

    def first() -> None:
        with cpu.onednn_off():
            first_in.set()
            second_in.wait(10)
        first_out.set()

    def second() -> None:
        first_in.wait(10)
        with cpu.onednn_off():
            second_in.set()
            first_out.wait(10)
            seen.append(bool(torch.backends.mkldnn.enabled))  # the first user left: still off for this one

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert seen == [False]
    assert torch.backends.mkldnn.enabled


@pytest.mark.parametrize("dtype,expected_during_decoding", [(torch.bfloat16, False), (torch.float32, True)])
def test_engine_decodes_bf16_with_onednn_off(
    tiny_llama_with_real_tokenizer: tuple[PreTrainedModel, PreTrainedTokenizerBase],
    dtype: torch.dtype,
    expected_during_decoding: bool,
) -> None:
    import copy

    model, tokenizer = tiny_llama_with_real_tokenizer
    model = copy.deepcopy(model).to(dtype)
    seen: list[bool] = []
    # generate() runs the model itself; prefill (Engine.encode) runs its decoder, which this hook does not see.
    hook = model.register_forward_pre_hook(lambda module, args: seen.append(bool(torch.backends.mkldnn.enabled)))
    try:
        engine = Engine(model=model, tokenizer=tokenizer, config=LMInfiniteConfig(n_local=16), reuse_prefixes=False)
        engine.generate("one two three four five six seven eight nine ten", GenerationSettings(max_new_tokens=5))
    finally:
        hook.remove()
    assert len(seen) >= 2 and set(seen) == {expected_during_decoding}
    assert torch.backends.mkldnn.enabled
