"""The perplexity harness (``python -m bench ppl``) on a tiny random-weight model: bucketing, tables, files."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import AutoConfig

from bench.ppl import BUCKET, bucket_ppl, main
from lminf_integrations import DCAConfig


def test_buckets_average_the_right_tokens() -> None:
    # nll[i] scores token i + 1; bucket 0 holds tokens 1..BUCKET-1, bucket 1 tokens BUCKET..2*BUCKET-1.
    nll = torch.cat([torch.full((BUCKET - 1,), 1.0), torch.full((BUCKET,), 2.0)])
    assert bucket_ppl(nll, 2) == [math.exp(1.0), math.exp(2.0)]


def test_command_writes_table_and_plot_for_any_text(tiny_model_dir: str, tmp_path: Path) -> None:
    text = tmp_path / "book.txt"
    text.write_text("Call me Ishmael. Some years ago, never mind how long precisely. " * 900, encoding="utf-8")
    results = tmp_path / "results"
    main(["--tokens", "6144", "--n-local", "2048", "--model", tiny_model_dir, "--dtype", "fp32",
          "--text", str(text), "--results", str(results), "--dca"])
    table = (results / "ppl.md").read_text(encoding="utf-8")
    assert "`book.txt`" in table and "--text" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "K–" in line]
    assert [r.split(" | ")[0] for r in rows] == ["| 0K–2K", "| 2K–4K", "| 4K–6K"]
    header = next(line for line in table.splitlines() if line.startswith("| tokens"))
    assert "LM-Infinite n_local=2048" in header and "baseline" in header
    # --dca adds its column and its own target line, against a whole training length of context.
    config = AutoConfig.from_pretrained(tiny_model_dir)
    chunk, local = DCAConfig().resolve(config.max_position_embeddings)
    assert f"DCA chunk={chunk} window={local}" in header
    assert f"- DCA chunk={chunk} window={local} (baseline: last {config.max_position_embeddings} tokens)" in table
    # Within the window LM-Infinite equals vanilla: the first bucket's perplexities agree.
    first = [float(c) for c in rows[0].strip("| ").split(" | ")[1:]]
    assert max(first) / min(first) < 1.001
    assert (results / "ppl.png").read_bytes()[:4] == b"\x89PNG"
