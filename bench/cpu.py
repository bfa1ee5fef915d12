"""Start-up and speed on this CPU: what a user waits for, and which dtype ``"auto"`` should pick here.

Every measurement runs in a fresh subprocess, as a user's command would:

* start-up: importing the engine; ``load_model()`` of the default model the first time (converting the GGUF
  file into the model cache) and later (reading the cache); ``lminf ask`` on a two-sentence file, end to end;
  ``lminf ask --state`` on a saved ~23K-token document, per question;
* dtypes: prefill and decoding tokens/s with LM-Infinite, and perplexity on the same text, for float32, bfloat16
  and float32 with dynamic int8 linear layers; ``dtype="auto"`` should pick the fastest whose perplexity is
  within 1% of float32's. Decoding is timed as the engine decodes (bf16 with oneDNN off, ``cpu.onednn_off``) and
  with oneDNN on, alternating, best of two rounds each;
* LM-Infinite vs vanilla prefill at 32K tokens in the dtype ``"auto"`` picks (``bench speed``'s measurement).

    python -m bench cpu                          # all of it (~10-25 minutes on 2 cores, by CPU class)
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python -m bench cpu
                                                 # the AVX2-only code path on a newer CPU

Writes ``cpu-<class>.md`` and ``.json`` to ``bench/results/`` (``cpu-<class>-capped`` for a capped run;
``--results DIR`` elsewhere); a part left out with ``--skip`` keeps its earlier result from that file, with the date
and command that measured it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    add_results,
    command_line,
    length_label,
    make_parser,
    positive_int,
    results_payload,
    write_json,
)

HERE = Path(__file__).resolve().parent
DTYPES = ("fp32", "bf16", "fp32+int8")
QUESTION = "What colour is the door?"
SHORT_DOCUMENT = "The house at the end of the lane has a green door. Its owner, Mara, grows tomatoes in the garden.\n"


def _timed(command: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return wall, result.stdout


def _one(kind: str, *extra: str, env: dict[str, str] | None = None) -> dict[str, float]:
    _, out = _timed([sys.executable, "-m", "bench", "cpu", "--one", kind, *extra], env)
    row: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return row


# ---- measurements inside one subprocess -------------------------------------------------------------------------
def load_seconds() -> dict[str, float]:
    started = time.perf_counter()
    from lminf_integrations.models import load_model

    imported = time.perf_counter()
    load_model()
    return {"import_s": imported - started, "load_s": time.perf_counter() - imported}


def dtype_row(name: str, n_tokens: int, decode_steps: int) -> dict[str, float]:
    """LM-Infinite prefill and decoding speed, and perplexity, with the default model in one dtype variant."""
    import torch

    from bench.common import token_ids
    from lminf_integrations import LMInfiniteConfig, new_cache, patch_model
    from lminf_integrations.cpu import decodes_faster_without_onednn, onednn_off
    from lminf_integrations.hf_compat import cache_kwargs
    from lminf_integrations.models import load_model

    model, tokenizer = load_model(None, "bf16" if name == "bf16" else "fp32")
    if name == "fp32+int8":
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    patch_model(model, LMInfiniteConfig(n_local=4096))
    ids = token_ids(tokenizer, n_tokens)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    with torch.inference_mode():
        decoder(input_ids=torch.tensor([ids[:256]]), **cache_kwargs(new_cache(model)))  # warm-up
        cache = new_cache(model)
        started = time.perf_counter()
        hidden = [
            decoder(input_ids=torch.tensor([ids[s : s + 2048]]), **cache_kwargs(cache)).last_hidden_state[0]
            for s in range(0, n_tokens, 2048)
        ]
        prefill_s = time.perf_counter() - started
        states, targets = torch.cat(hidden)[:-1], torch.tensor(ids[1:])
        losses = [
            torch.nn.functional.cross_entropy(head(states[s : s + 512]).float(), targets[s : s + 512], reduction="none")
            for s in range(0, len(targets), 512)
        ]
        nll = torch.cat(losses)
        token = torch.tensor([[ids[-1]]])
        model(input_ids=token, **cache_kwargs(cache))
        rates: dict[str, list[float]] = {"engine": [], "onednn": []}
        for _ in range(2):  # alternating, so that a drift in the machine's speed hits both
            for way in rates:
                off = way == "engine" and decodes_faster_without_onednn(model.dtype, model.device)
                with onednn_off() if off else contextlib.nullcontext():
                    started = time.perf_counter()
                    for _ in range(decode_steps):
                        logits = model(input_ids=token, **cache_kwargs(cache), logits_to_keep=1).logits
                        token = logits[:, -1:].argmax(-1)
                    rates[way].append(decode_steps / (time.perf_counter() - started))
    return {
        "prefill_tok_s": n_tokens / prefill_s,
        "decode_tok_s": max(rates["engine"]),
        "decode_onednn_tok_s": max(rates["onednn"]),
        "ppl": float(nll.mean().exp()),
    }


# ---- the report ---------------------------------------------------------------------------------------------------
def startup(repeats: int) -> dict[str, float]:
    rows: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        fresh = {"LMINF_CACHE_DIR": str(Path(folder) / "cache")}
        cold = _one("load", env=fresh)
        warm = [_one("load", env=fresh) for _ in range(repeats)]
        rows["import_s"] = statistics.median(w["import_s"] for w in warm)
        rows["first_load_s"] = cold["load_s"]
        rows["load_s"] = statistics.median(w["load_s"] for w in warm)
        document = Path(folder) / "two-sentences.txt"
        document.write_text(SHORT_DOCUMENT)
        lminf = [sys.executable, "-m", "lminf_integrations"]
        ask = [*lminf, "ask", str(document), QUESTION, "--max-new-tokens", "24"]
        asks = [_timed(ask, fresh) for _ in range(repeats)]
        rows["ask_s"] = statistics.median(wall for wall, _ in asks)
        answer = asks[0][1].strip()
        long_document = Path(folder) / "long.txt"
        long_document.write_text(_long_text(23_000))
        state = Path(folder) / "long.state"
        rows["encode_s"], _ = _timed([*lminf, "encode", str(long_document), "-o", str(state), "--no-progress"], fresh)
        questions = ["What does the with statement do?", "What is a lambda?", "What does yield do?"]
        walls = [
            _timed([*lminf, "ask", "--state", str(state), q, "--max-new-tokens", "24", "--no-progress"], fresh)[0]
            for q in questions[:repeats]
        ]
        rows["ask_state_s"] = statistics.median(walls)
    print(f"start-up: {rows}; answer: {answer!r}", flush=True)
    rows["answer"] = answer  # type: ignore[assignment]
    return rows


def _long_text(n_tokens: int) -> str:
    from bench.common import pydoc_text
    from lminf_integrations.models import load_model

    _, tokenizer = load_model()
    ids = tokenizer(pydoc_text(), add_special_tokens=False)["input_ids"][:n_tokens]
    return str(tokenizer.decode(ids))


def prefill_ratio(dtype: str, n_tokens: int) -> dict[str, float]:
    rows = {}
    for mode in ("vanilla", "lminf"):
        speed = ["speed", "--one", mode, str(n_tokens), "--dtype", dtype, "--decode-steps", "4"]
        _, out = _timed([sys.executable, "-m", "bench", *speed])
        rows[mode] = json.loads(out.strip().splitlines()[-1])["prefill_tok_s"]
        print(f"{mode} {n_tokens}: {rows[mode]:.0f} tok/s", flush=True)
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("cpu", __doc__)
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="runs of each start-up command (median reported)")  # fmt: skip
    parser.add_argument("--dtype-tokens", type=positive_int, default=8192, help="text length for the dtype comparison")
    parser.add_argument("--decode-steps", type=positive_int, default=32, help="decoding steps timed per dtype")
    parser.add_argument("--ratio-tokens", type=positive_int, default=32768,
                        help="context of the vanilla vs LM-Inf prefill")  # fmt: skip
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["startup", "dtypes", "ratio"],
        help="parts not measured: each is copied, with the date and command that measured it, from the previous "
        "cpu-<class>.json in the results folder (--results), where there is one",
    )  # fmt: skip
    add_results(parser, "cpu-<class>.md and cpu-<class>.json")
    parser.add_argument(
        "--one", nargs="+", default=None, metavar="KIND",
        help="one measurement in this process, printed as a JSON line, nothing written: 'load' or 'dtype NAME' "
        "(the run starts these in fresh subprocesses; default: the whole run)",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.one:
        kind = args.one[0]
        if not (args.one == ["load"] or (kind == "dtype" and len(args.one) == 2 and args.one[1] in DTYPES)):
            parser.error(f"argument --one: 'load' or 'dtype NAME' (NAME one of {', '.join(DTYPES)}), got {args.one}")
        row = load_seconds() if kind == "load" else dtype_row(args.one[1], args.dtype_tokens, args.decode_steps)
        print(json.dumps(row, allow_nan=False))
        return
    command = command_line("cpu", argv)

    from lminf_integrations.cpu import cpu_info
    from lminf_integrations.models import default_dtype

    auto = "bf16" if str(default_dtype()) == "torch.bfloat16" else "fp32"
    # Skipped parts keep their results from an earlier run on this CPU class, each with when and how it was measured.
    report = _previous_report(args.results)
    report.update(cpu=cpu_info().describe(), auto=auto)
    measured: dict[str, str] = report.setdefault("measured", {})
    if "startup" not in args.skip:
        report["startup"] = startup(args.repeats)
        measured["startup"] = _stamp(command)
    if "dtypes" not in args.skip:
        dtypes = {}
        for name in DTYPES:
            dtypes[name] = _one("dtype", name, "--dtype-tokens", str(args.dtype_tokens), "--decode-steps",
                                str(args.decode_steps))
            print(f"{name}: {dtypes[name]}", flush=True)
        report["dtypes"] = dtypes
        measured["dtypes"] = _stamp(command)
    if "ratio" not in args.skip:
        report["prefill_32k"] = prefill_ratio(auto, args.ratio_tokens)
        measured["prefill_32k"] = _stamp(command)
        report["ratio_tokens"] = args.ratio_tokens
    write_report(report, args.results, command)


def _report_name() -> str:
    """``cpu-<class>``, and ``-capped`` where PyTorch is limited below the CPU (a newer CPU running the AVX2 path):
    that run and one on a CPU of the class itself are kept apart."""
    from lminf_integrations.cpu import cpu_info

    info = cpu_info()
    return "cpu-" + info.cpu_class.lower().replace(" ", "-").replace("_", "-") + ("-capped" if info.limited else "")


def _previous_report(results: Path) -> dict[str, Any]:
    try:
        previous: dict[str, Any] = json.loads((results / f"{_report_name()}.json").read_text())
        return previous
    except (OSError, ValueError):
        return {}


def _stamp(command: str) -> str:
    """When and by which command a part was measured (kept with the part when a later run skips it)."""
    capped = " with `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2`"
    env = capped if os.environ.get("ATEN_CPU_CAPABILITY", "").lower() == "avx2" else ""
    return f"{time.strftime('%Y-%m-%d')}, `{command}`{env}"


def write_report(report: dict[str, Any], results: Path, command: str) -> None:
    """``cpu-<class>.md`` and ``.json``: the JSON is the report (every part, with its stamp) under the command and
    machine of this run, and is what a later ``--skip`` reads back."""
    from bench.common import machine_line, write_result
    from lminf_integrations.cpu import cpu_info

    measured = report.get("measured", {})
    lines = [
        f"# Start-up and speed on one CPU class: {cpu_info().cpu_class}\n",
        f"{machine_line()}. `dtype=\"auto\"` picks **{report['auto']}** here.\n",
    ]
    startup_rows = report.get("startup")
    if isinstance(startup_rows, dict):
        lines += [
            "## Start-up (wall seconds, fresh process each; median of the repeats)\n",
            "| import the engine | first `load_model()` (converts the GGUF) | later `load_model()` | "
            "`lminf ask` two sentences, end to end | `lminf encode` 23K tokens | "
            "`lminf ask --state` 23K, per question |",
            "|---|---|---|---|---|---|",
            f"| {startup_rows['import_s']:.1f} | {startup_rows['first_load_s']:.1f} | {startup_rows['load_s']:.1f} | "
            f"{startup_rows['ask_s']:.1f} | {startup_rows['encode_s']:.1f} | {startup_rows['ask_state_s']:.1f} |\n",
            f"Answer to {QUESTION!r}: {startup_rows['answer']!r}. Measured {measured.get('startup', '?')}.\n",
        ]
    dtypes = report.get("dtypes")
    if isinstance(dtypes, dict):
        base = dtypes["fp32"]["ppl"]
        lines += [
            f"## Dtypes (LM-Infinite, n_local 4096, pydoc text; measured {measured.get('dtypes', '?')})\n",
            "| dtype | prefill tok/s | decode tok/s (as the engine decodes) | decode tok/s with oneDNN | "
            "perplexity | vs fp32 |",
            "|---|---|---|---|---|---|",
        ]
        for name, row in dtypes.items():
            lines.append(
                f"| {name} | {row['prefill_tok_s']:.0f} | {row['decode_tok_s']:.1f} | "
                f"{row['decode_onednn_tok_s']:.1f} | {row['ppl']:.3f} | {(row['ppl'] / base - 1) * 100:+.2f}% |"
            )
        lines.append("")
    ratio = report.get("prefill_32k")
    if isinstance(ratio, dict):
        lines += [
            f"## Prefill at {length_label(report.get('ratio_tokens', 32768))} tokens in {report['auto']} "
            "(`bench speed`'s "
            f"measurement; measured {measured.get('prefill_32k', '?')})\n",
            "| vanilla tok/s | LM-Infinite tok/s | ratio |",
            "|---|---|---|",
            f"| {ratio['vanilla']:.0f} | {ratio['lminf']:.0f} | {ratio['lminf'] / ratio['vanilla']:.2f}× |\n",
        ]
    text = "\n".join(lines)
    print(text)
    name = _report_name()
    write_result(f"{name}.md", text, results)
    parts = {key: value for key, value in report.items() if key not in ("command", "machine")}  # an earlier run's
    write_json(f"{name}.json", results_payload(command, **parts), results)


if __name__ == "__main__":
    main()
