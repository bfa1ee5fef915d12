"""The CPU harness (``python -m bench cpu``): a small slice of its dtype comparison on the real default model."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from bench.cpu import main


def test_dtype_table_keeps_earlier_parts_with_their_stamps(tmp_path: Path) -> None:
    from bench.cpu import _report_name

    name = _report_name()  # this machine's report (its naming: the test below)
    earlier = {"startup": {"import_s": 1.0, "first_load_s": 9.0, "load_s": 0.5, "ask_s": 3.0, "encode_s": 60.0,
                           "ask_state_s": 4.0, "answer": "green"},
               "measured": {"startup": "earlier, `python -m bench cpu --repeats 3`"}}
    (tmp_path / f"{name}.json").write_text(json.dumps(earlier))
    argv = ["--skip", "startup", "ratio", "--dtype-tokens", "256", "--decode-steps", "2", "--results", str(tmp_path)]
    main(argv)
    table = (tmp_path / f"{name}.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| fp32")
            or line.startswith("| bf16")}
    assert set(rows) == {"fp32", "bf16", "fp32+int8"}
    assert rows["fp32"].rstrip(" |").endswith("+0.00%")
    assert "| 1.0 | 9.0 | 0.5 | 3.0 | 60.0 | 4.0 |" in table  # the skipped part, kept
    assert "Measured earlier, `python -m bench cpu --repeats 3`" in table
    assert f"`python -m bench cpu {shlex.join(argv)}`" in table  # the part measured now, stamped with the command
    report = json.loads((tmp_path / f"{name}.json").read_text())
    assert report["command"] == f"python -m bench cpu {shlex.join(argv)}" and report["machine"]
    assert all(row["ppl"] > 1 and row["prefill_tok_s"] > 0 for row in report["dtypes"].values())


def test_a_capped_run_and_a_run_on_the_class_itself_write_different_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    """``make test-avx2``'s code path on a newer CPU must not overwrite (or merge into) a real AVX2 CPU's report."""
    from bench import cpu as bench_cpu
    from lminf_integrations import cpu

    real = cpu.CpuInfo("AMD EPYC", frozenset({"avx2", "fma"}), "AVX2", "AuthenticAMD")
    capped = cpu.CpuInfo("AMD EPYC", frozenset({"avx2", "fma", "avx512f", "avx512_bf16"}), "AVX2", "AuthenticAMD")
    names = []
    for info in (real, capped):
        monkeypatch.setattr(cpu, "cpu_info", lambda info=info: info)
        names.append(bench_cpu._report_name())
    assert names == ["cpu-avx2", "cpu-avx2-capped"]
    assert "limited to AVX2" in capped.describe() and "limited" not in real.describe()
