"""The GPU check (``python -m bench gpu``) run on the CPU with tiny shapes: every step runs, every exactness check
and the split comparison pass, and the report is written. On a GPU the same command checks CUDA (issue 19)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bench import gpu


def test_the_gpu_check_runs_its_steps_on_a_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step runs on a CPU, as on a GPU machine without the default model or a network: the tokenizer comes as
    a folder (``make gpu-bundle``; the default model's package is too large to carry).

    The compiled steps compile with inductor's defaults, as on a GPU (where the package's CPU settings do not
    apply): the CPU settings' autotuned GEMMs would add minutes of compiling to the suite here, and their steps are
    checked against eager ones in test_compiled_decoding and test_cli."""
    from lminf_integrations import compiled, models

    folder = tmp_path / "tokenizer"
    models.load_tokenizer(None).save_pretrained(folder)

    def not_installed() -> Path:
        raise FileNotFoundError("the default model is not installed")

    monkeypatch.setattr(models, "default_model_path", not_installed)
    with pytest.raises(FileNotFoundError):
        models.load_tokenizer(None)  # the stand-in works: the default model is out of reach
    monkeypatch.setattr(compiled, "INDUCTOR_SETTINGS", {})
    # One compared length (each compiles vanilla's steps anew) and LM-Infinite's longest row beyond it.
    argv = ["--device", "cpu", "--quick", "--compiled-decode", "--lengths", "256", "--max-tokens", "512"]
    report = gpu.main([*argv, "--tokenizer", str(folder), "--results", str(tmp_path)])
    strategies = {c.what.split(": ", 1)[1] for c in report.checks}
    assert {"lm-infinite window", "lm-infinite full + top-k", "dca"} <= strategies
    assert {c.what.split(":")[0] for c in report.checks} >= {"llama", "mistral", "qwen2", "qwen3", "xl3m"}
    assert "lm-infinite compiled decoding vs eager" in strategies
    assert all(c.ok for c in report.checks), [c for c in report.checks if not c.ok]
    assert {r.mode for r in report.speed} == {"vanilla", "lm-infinite"}
    assert all(r.prefill_tok_s > 0 and r.decode_tok_s > 0 for r in report.speed)
    # Compiled decoding is timed too (through generate, CUDA graphs on a GPU): LM-Infinite's compile_decode=True at
    # every length, vanilla's from a StaticCache at the compared lengths (each of its lengths compiles anew)
    assert all((r.compiled_decode_tok_s or 0) > 0 for r in report.speed if r.mode == "lm-infinite")
    vanilla = {r.tokens: r.compiled_decode_tok_s for r in report.speed if r.mode == "vanilla"}
    assert (vanilla[256] or 0) > 0 and set(vanilla) == {256, 512} and vanilla[512] is None, vanilla
    assert {r.tokens for r in report.speed if r.mode == "lm-infinite"} == {256, 512}
    assert report.split and all(c.ok for c in report.split)
    # the split model also through the window cache, whose layers then live on the devices of theirs
    assert {c.what for c in report.split} == {
        "split vs whole: unpatched", "split vs whole: lm-infinite", "split vs whole: lm-infinite, window cache"
    }  # fmt: skip
    # The split's two copies are let go (on a GPU they would hold its memory through the speed step).
    assert not [key for key in models._loaded if not Path(key[0]).exists()]
    assert list(report.ended) == ["exactness", "split", "speed and memory"]  # when each step ended, in order
    assert sorted(report.ended.values()) == list(report.ended.values())
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


def test_a_check_stopped_in_its_timed_part_leaves_its_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lent GPU has a time limit: what the check did before it stopped is in the report. The short steps
    (exactness, the split model) come before the open-ended timed part, so a stop there loses only speed rows."""

    def stopped(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(gpu, "speed", stopped)
    with pytest.raises(KeyboardInterrupt):
        gpu.main(["--device", "cpu", "--quick", "--results", str(tmp_path)])
    payload = json.loads((tmp_path / "gpu.json").read_text(encoding="utf-8"))
    assert payload["checks"] and all(c["error"] <= c["bound"] for c in payload["checks"])
    assert payload["split"] and all(c["error"] <= c["bound"] for c in payload["split"])
    assert payload["speed"] == []
    assert "| xl3m: answer and chosen segments as on the CPU |" in (tmp_path / "gpu.md").read_text(encoding="utf-8")


def test_a_step_that_raises_is_reported_and_the_others_still_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One run on a lent GPU must bring back every step it can: a step that raises (a kernel that fails to compile,
    say) is named in the report with its error, the other steps run, and the command exits non-zero. FlexAttention
    that did not compile (attention then takes slower exact kernels) is reported as a failure too."""
    from bench.__main__ import main as bench_main
    from lminf_integrations.ops import flex

    def fails(*args: object) -> gpu.Check:
        raise RuntimeError("the kernel did not compile")

    monkeypatch.setattr(gpu, "_xl3m_check", fails)
    monkeypatch.setattr(flex, "COMPILE_FAILURE", "InductorError: no Triton")
    with pytest.raises(SystemExit) as stopped:
        bench_main(["gpu", "--device", "cpu", "--quick", "--lengths", "128", "--max-tokens", "128",
                    "--results", str(tmp_path)])  # fmt: skip
    assert stopped.value.code == 1
    payload = json.loads((tmp_path / "gpu.json").read_text(encoding="utf-8"))
    assert any("xl3m" in e and "RuntimeError: the kernel did not compile" in e for e in payload["errors"])
    assert len(payload["checks"]) >= 12 and all(c["error"] <= c["bound"] for c in payload["checks"])
    assert payload["split"] and {r["mode"] for r in payload["speed"]} == {"vanilla", "lm-infinite"}
    assert "RuntimeError: the kernel did not compile" in (tmp_path / "gpu.md").read_text(encoding="utf-8")
    assert "FlexAttention did not compile: InductorError: no Triton" in payload["errors"]


def test_the_timed_rows_run_the_comparison_first_then_the_longest_then_the_rest() -> None:
    """The rows the targets read (both modes at the compared lengths, LM-Infinite at the longest) come before the
    doublings in between, which fill whatever time is left."""
    assert gpu.speed_plan([32768, 131072], 1 << 20) == [
        ("vanilla", 32768), ("lm-infinite", 32768), ("vanilla", 131072), ("lm-infinite", 131072),
        ("lm-infinite", 1 << 20),
        ("vanilla", 262144), ("lm-infinite", 262144), ("vanilla", 524288), ("lm-infinite", 524288),
        ("vanilla", 1 << 20),
    ]  # fmt: skip
    assert gpu.n_target_rows([32768, 131072], 1 << 20) == 5


def test_past_the_time_limit_only_the_rows_the_targets_do_not_read_are_skipped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The compared rows and LM-Infinite's longest always run (the targets read them); each other row is predicted
    from its mode's last (vanilla's prefill grows as n², LM-Infinite's as n) and skipped where it would end past the
    time limit, while shorter ones still run; a mode that ran out of memory runs no longer rows while the other goes
    on. ``measure`` is replaced by rows of chosen times: the schedule, not the model, is under test here (the tests
    above time the real tiny model)."""
    import argparse
    import time

    import torch

    def measure(model: object, mode: str, n: int, *args: object, **kwargs: object) -> gpu.SpeedRow:
        if mode == "vanilla" and n >= 256:
            raise torch.OutOfMemoryError("out of memory")
        seconds = 10.0 * (n / 128) ** (2 if mode == "vanilla" else 1)
        return gpu.SpeedRow(mode, n, seconds, n / seconds, 1.0, 0.0)

    monkeypatch.setattr(gpu, "measure", measure)
    args = argparse.Namespace(shape="tiny", lengths=[128, 256], max_tokens=2048, chunk=64, decode_steps=2,
                              n_local=64, compiled_decode=False)  # fmt: skip
    report = gpu.Report("cpu")
    # 50 s left throughout (the stand-in takes no time). LM-Infinite's 2048-token row (160 s) runs all the same; from
    # it, 512 tokens are predicted at 40 s (run) and 1024 at 80 s (skipped). Vanilla runs out of memory at 256 tokens.
    gpu.speed(args, torch.device("cpu"), torch.float32, report, deadline=time.perf_counter() + 50)
    assert [(r.mode, r.tokens) for r in report.speed] == [
        ("vanilla", 128), ("lm-infinite", 128), ("lm-infinite", 256), ("lm-infinite", 2048), ("lm-infinite", 512),
    ]  # fmt: skip
    skipped = next(s for s in report.skipped if s.startswith("lm-infinite at 1024 tokens"))
    # the reason gives both sides of the comparison: a row predicted to take 0 s is skipped only when no time is left
    assert re.search(r"predicted 80 s, (49|50) s of the time limit left", skipped), skipped
    assert any(s.startswith("vanilla at 256 tokens") and "out of device memory" in s for s in report.skipped)
    assert not any("vanilla at 512" in s for s in report.skipped)  # after running out of memory, not tried at all


def test_vanillas_static_copy_continues_its_cache() -> None:
    """Vanilla's compiled decoding (transformers' StaticCache, whose fixed shapes let ``generate`` compile its steps)
    starts from a copy of the eager prefill's DynamicCache: steps from the copy must give the logits of the whole
    sequence computed without a cache. The steps run eagerly here; the check above compiles them (its vanilla rows'
    compiled decoding)."""
    import torch
    from transformers import DynamicCache

    from lminf_integrations.compiled import generate_kwargs
    from lminf_integrations.hf_compat import cache_kwargs
    from tests.tolerances import network_bound

    model = gpu.random_model(gpu.TINY_SHAPE, torch.device("cpu"), torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        prefilled = DynamicCache(config=model.config)
        model(ids[:, :-1], **cache_kwargs(prefilled))
        static = gpu.static_copy(prefilled, model.config, room=8)
        assert [layer.max_cache_len for layer in static.layers] == [39 + 8] * model.config.num_hidden_layers
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(static), max_new_tokens=6,
                             min_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=0, **generate_kwargs(False))  # fmt: skip
        stepped = torch.stack(out.logits).float()
        whole = model(out.sequences[:, :-1]).logits[0, ids.shape[1] - 1 :, None]
    assert stepped.shape == whole.shape == (6, 1, model.config.vocab_size)
    error = float((stepped - whole).abs().max())
    reduction = max(model.config.hidden_size, model.config.intermediate_size, ids.shape[1] + 6)  # the longest sum
    bound = network_bound(whole, torch.float32, reduction, model.config.num_hidden_layers)
    assert error <= bound, (error, bound)


def test_compiled_decoding_that_fails_keeps_the_rows_eager_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled steps come last in a timed row: if they fail (a step that does not compile on the device's torch,
    CUDA graphs out of memory), the row's prefill, eager decoding and memory, which the targets read, are kept, and
    the failure is reported as an error of that row's compiled decoding."""
    import argparse
    import time

    import torch

    def fails(*args: object) -> float:
        raise RuntimeError("the step did not compile")

    monkeypatch.setattr(gpu, "_compiled_decode", fails)
    args = argparse.Namespace(shape="tiny", lengths=[128], max_tokens=128, chunk=64, decode_steps=2, n_local=64,
                              compiled_decode=True, argv=[], device="cpu", dtype="fp32", time_limit=60.0)  # fmt: skip
    report = gpu.Report("cpu")
    gpu.speed(args, torch.device("cpu"), torch.float32, report, deadline=time.perf_counter() + 60)
    table = [line for line in gpu.markdown(report, args).splitlines() if line.startswith(("| vanilla", "| lm-inf"))]
    assert len(table) == 2 and all("| failed (see errors) |" in line for line in table), table
    assert [(r.mode, r.tokens) for r in report.speed] == [("vanilla", 128), ("lm-infinite", 128)]
    assert all(r.prefill_tok_s > 0 and r.decode_tok_s > 0 and r.compiled_decode_tok_s is None for r in report.speed)
    assert report.errors == [
        f"{mode} at 128 tokens, compiled decoding: RuntimeError: the step did not compile"
        for mode in ("vanilla", "lm-infinite")
    ]
    assert not report.ok


@pytest.mark.parametrize("layers", [2, 4, 8])
def test_the_split_budget_puts_half_the_layers_on_the_gpu_by_accelerates_own_placement(layers: int) -> None:
    """The GPU run's split loads the large model's shape with ``max_memory={0: budget, "cpu": ...}``: the budget must
    make accelerate place the embedding and half the layers on the GPU and the rest on the CPU, not everything on one
    device (accelerate keeps room for the largest offloaded module, the output head). A model on ``meta`` (no
    weights, no GPU needed) is placed the same way."""
    import torch
    from accelerate import infer_auto_device_map
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**{**gpu.LLAMA3_8B, "num_hidden_layers": layers})).to(torch.bfloat16)
    placed = infer_auto_device_map(model, max_memory={0: gpu.split_budget(model), "cpu": 64 * 2**30},
                                   no_split_module_classes=model._no_split_modules)  # fmt: skip
    on_gpu = [name for name, where in placed.items() if where == 0]
    assert on_gpu == ["model.embed_tokens"] + [f"model.layers.{i}" for i in range(layers // 2)], placed
    assert set(placed.values()) == {0, "cpu"}


def test_a_function_past_dynamos_recompile_limit_is_reported() -> None:
    """Past dynamo's recompile limit a compiled function (FlexAttention, in the check's one process of many shapes
    and dtypes) runs uncompiled for new inputs, with only a log line: its times would no longer be the kernel's.
    The check watches for that line and reports it as an error."""
    import torch

    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    compiled = torch.compile(double, backend="eager")
    with gpu.RecompileLimitWatch() as watch, torch._dynamo.config.patch(recompile_limit=1):
        for dtype in (torch.float32, torch.float64, torch.int64):  # each dtype a new guard: past a limit of 1
            compiled(torch.ones(3, dtype=dtype))
    torch._dynamo.reset()
    assert watch.hits and "double" in watch.hits[0], watch.hits
