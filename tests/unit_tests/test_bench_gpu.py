"""The GPU check (``python -m bench gpu``) run on the CPU with tiny shapes: every step runs, every exactness check
and the split comparison pass, and the report is written. On a GPU the same command checks CUDA (issue 19)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import gpu


def test_the_gpu_check_runs_its_steps_on_a_cpu(tmp_path: Path) -> None:
    report = gpu.main(["--device", "cpu", "--quick", "--compiled-decode", "--results", str(tmp_path)])
    strategies = {c.what.split(": ", 1)[1] for c in report.checks}
    assert {"lm-infinite window", "lm-infinite full + top-k", "dca"} <= strategies
    assert {c.what.split(":")[0] for c in report.checks} >= {"llama", "mistral", "qwen2", "qwen3", "xl3m"}
    assert "lm-infinite compiled decoding vs eager" in strategies
    assert all(c.ok for c in report.checks), [c for c in report.checks if not c.ok]
    assert {r.mode for r in report.speed} == {"vanilla", "lm-infinite"}
    assert all(r.prefill_tok_s > 0 and r.decode_tok_s > 0 for r in report.speed)
    # LM-Infinite's compiled decoding (compile_decode=True through generate, CUDA graphs on a GPU) is timed too
    assert all((r.compiled_decode_tok_s or 0) > 0 for r in report.speed if r.mode == "lm-infinite")
    assert all(r.compiled_decode_tok_s is None for r in report.speed if r.mode == "vanilla")
    assert report.split and all(c.ok for c in report.split)
    payload = json.loads((tmp_path / "gpu.json").read_text(encoding="utf-8"))
    assert len(payload["checks"]) == len(report.checks)
    assert "## Exactness" in (tmp_path / "gpu.md").read_text(encoding="utf-8")


def test_without_cuda_the_check_says_how_to_run_it_on_a_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit):
        gpu.main([])
    assert "--device cpu --quick" in capsys.readouterr().err


def test_with_a_tokenizer_folder_the_check_needs_no_default_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GPU machine without network gets the tokenizer as a folder (``make gpu-bundle``): the default model's
    package is too large to carry, and the check must then run without it."""
    from lminf_integrations import models

    folder = tmp_path / "tokenizer"
    models.load_tokenizer(None).save_pretrained(folder)

    def not_installed() -> Path:
        raise FileNotFoundError("the default model is not installed")

    monkeypatch.setattr(models, "default_model_path", not_installed)
    with pytest.raises(FileNotFoundError):
        models.load_tokenizer(None)  # the stand-in works: the default model is out of reach
    report = gpu.main(["--device", "cpu", "--quick", "--tokenizer", str(folder), "--results", str(tmp_path)])
    assert report.checks and all(c.ok for c in report.checks)
    assert report.split and all(c.ok for c in report.split)


def test_a_check_stopped_after_exactness_leaves_its_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lent GPU has a time limit: what the check did before it stopped is in the report."""

    def stopped(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(gpu, "speed", stopped)
    with pytest.raises(KeyboardInterrupt):
        gpu.main(["--device", "cpu", "--quick", "--results", str(tmp_path)])
    payload = json.loads((tmp_path / "gpu.json").read_text(encoding="utf-8"))
    assert payload["checks"] and all(c["error"] <= c["bound"] for c in payload["checks"])
    assert payload["speed"] == [] and payload["split"] == []
    assert "| xl3m: answer and chosen segments as on the CPU |" in (tmp_path / "gpu.md").read_text(encoding="utf-8")
