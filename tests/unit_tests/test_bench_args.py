"""The bench command lines: bad arguments are refused by argparse (usage, an ``error:`` line, exit status 2) before
any model loads; the helpers every command shares (positive counts, the results folder, length labels, the
command line written into the results, strict JSON); ``python -m bench``'s one-line errors; ``--help``.

No model runs here: each refusal must come before one would load (a stand-in ``load_model`` fails the test)."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import shlex
import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from bench import common
from bench.__main__ import COMMANDS

WITH_DTYPE = [name for name in COMMANDS if name != "cpu"]  # cpu compares every dtype itself


def _module(command: str) -> ModuleType:
    return importlib.import_module(COMMANDS[command])


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Loading a model (or a tokenizer) fails the test: the arguments must be refused before."""
    from lminf_integrations import models

    def refused(*args: object, **kwargs: object) -> Any:
        raise AssertionError("a model was loaded before the arguments were checked")

    for module in [models, *(_module(c) for c in COMMANDS)]:
        for name in ("load_model", "load_tokenizer"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, refused)
    yield


def _refused(command: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The ``error:`` line of an argparse refusal of ``argv`` (asserting usage and exit status 2)."""
    with pytest.raises(SystemExit) as stopped:
        _module(command).main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2, err
    assert err.startswith("usage: python -m bench " + command), err
    return next(line for line in err.splitlines() if "error:" in line)


BAD_ARGUMENTS = [
    ("gpu", ["--lengths", "0"], "--lengths"),
    ("gpu", ["--lengths", "-1"], "--lengths"),
    ("gpu", ["--max-tokens", "0"], "--max-tokens"),
    ("gpu", ["--chunk", "0"], "--chunk"),
    ("gpu", ["--decode-steps", "0"], "--decode-steps"),
    ("gpu", ["--n-local", "0"], "--n-local"),
    ("gpu", ["--split-tokens", "0"], "--split-tokens"),
    ("gpu", ["--split-layers", "0"], "--split-layers"),
    ("gpu", ["--time-limit", "0"], "--time-limit"),
    ("band", ["--queries", "4096", "--window", "4096"], "--queries"),
    ("band", ["--queries", "4000", "--window", "4096"], "--queries"),  # a core narrower than the blocks
    ("band", ["--repeats", "0"], "--repeats"),
    ("band", ["--blocks", "0"], "--blocks"),
    ("ppl", ["--tokens", "100"], "2048"),
    ("ppl", ["--text", "/no/such"], "/no/such"),
    ("ppl", ["--n-local", "0"], "--n-local"),
    ("ppl", ["--vanilla-max", "0"], "--vanilla-max"),
    ("passkey", ["--depths", "1.5"], "--depths"),
    ("passkey", ["--depths", "-0.1"], "--depths"),
    ("passkey", ["--keys", "0"], "--keys"),
    ("passkey", ["--lengths", "0"], "--lengths"),
    ("passkey", ["--n-local", "-4"], "--n-local"),
    ("rag-vs-full", ["--questions", "0"], "--questions"),
    ("rag-vs-full", ["--tokens", "0"], "--tokens"),
    ("rag-vs-full", ["--questions", "3", "--multi", "4"], "--multi"),
    ("rag-vs-full", ["--xl3m-hop-confidence", "2"], "--xl3m-hop-confidence"),
    ("rag-vs-full", ["--max-new-tokens", "0"], "--max-new-tokens"),
    ("speed", ["--decode-steps", "0"], "--decode-steps"),
    ("speed", ["--patched", "0"], "--patched"),
    ("speed", ["--n-local", "0"], "--n-local"),
    ("speed", ["--one", "nonsense", "4096"], "--one"),
    ("speed", ["--one", "lminf", "0"], "--one"),
    ("decode", ["--lengths", "0"], "--lengths"),
    ("decode", ["--decode-steps", "0"], "--decode-steps"),
    ("reuse", ["--tokens", "0"], "--tokens"),
    ("reuse", ["--questions", "0"], "--questions"),
    ("cpu", ["--repeats", "0"], "--repeats"),
    ("cpu", ["--dtype-tokens", "0"], "--dtype-tokens"),
]


@pytest.mark.usefixtures("no_model")
@pytest.mark.parametrize(("command", "argv", "named"), BAD_ARGUMENTS, ids=lambda v: " ".join(v) if isinstance(
    v, list) else str(v))  # fmt: skip
def test_bad_arguments_are_refused_before_a_model_loads(
    command: str, argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert named in _refused(command, argv, capsys)


@pytest.mark.usefixtures("no_model")
def test_ppl_says_why_its_tokens_must_fill_a_bucket(capsys: pytest.CaptureFixture[str]) -> None:
    line = _refused("ppl", ["--tokens", "100"], capsys)
    assert "--tokens" in line and "2048" in line and "bucket" in line


@pytest.mark.usefixtures("no_model")
def test_band_names_the_largest_query_count_that_fits(capsys: pytest.CaptureFixture[str]) -> None:
    """The core + inner band layout needs ``window - queries >= BLOCK`` (the attention's own condition); with
    ``queries >= window`` its core has no keys and the kernel dies of SIGFPE."""
    line = _refused("band", ["--queries", "4096", "--window", "4096", "--blocks", "128", "256"], capsys)
    assert "3840" in line  # 4096 - 256, the largest block


@pytest.mark.usefixtures("no_model")
@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_unwritable_results_folder_is_refused_up_front(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    line = _refused(command, ["--results", "/dev/null/x"], capsys)
    assert "--results" in line and "/dev/null/x" in line


@pytest.mark.usefixtures("no_model")
@pytest.mark.parametrize("command", WITH_DTYPE)
def test_an_unknown_dtype_is_refused(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    line = _refused(command, ["--dtype", "fp13"], capsys)
    assert "--dtype" in line and "invalid choice" in line


def test_a_missing_results_folder_is_created(tmp_path: Path) -> None:
    folder = tmp_path / "a" / "b"
    assert common.ensure_writable(folder) == folder and folder.is_dir()
    assert list(folder.iterdir()) == []  # the write probe leaves nothing behind


# ---- shared helpers -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["0", "-1", "1.5", "x"])
def test_positive_int_refuses(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        common.positive_int(text)


def test_fraction_is_within_zero_and_one() -> None:
    assert common.fraction("0") == 0.0 and common.fraction("1") == 1.0 and common.fraction("0.25") == 0.25
    for text in ("1.01", "-0.5", "nan", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            common.fraction(text)


@pytest.mark.parametrize(
    ("tokens", "label"), [(100, "100"), (1000, "1000"), (1024, "1K"), (1536, "1.5K"), (5000, "5000"), (131072, "128K")]
)
def test_length_labels_are_exact(tokens: int, label: str) -> None:
    assert common.length_label(tokens) == label


def test_the_command_line_round_trips_its_arguments() -> None:
    argv = ["--text", "my book.txt", "--n-local", "4096", "8192", "--model", "it's/here"]
    line = common.command_line("ppl", argv)
    assert line.startswith("python -m bench ppl ")
    assert shlex.split(line) == ["python", "-m", "bench", "ppl", *argv]
    assert common.command_line("band", []) == "python -m bench band"


def test_results_json_is_strict(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        common.write_json("x.json", {"peak_gib": math.nan}, tmp_path)
    assert not (tmp_path / "x.json").exists()
    common.write_json("y.json", {"peak_gib": None}, tmp_path)
    assert json.loads((tmp_path / "y.json").read_text(encoding="utf-8")) == {"peak_gib": None}


def _strict(text: str) -> Any:
    def refused(constant: str) -> Any:
        raise AssertionError(f"{constant} in a results JSON")

    return json.loads(text, parse_constant=refused)


# ---- python -m bench -------------------------------------------------------------------------------------------
def test_a_runtime_error_a_person_can_fix_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A model folder that does not exist: ``FileNotFoundError`` from the package, one line, exit status 1."""
    from bench.__main__ import main

    with pytest.raises(SystemExit) as stopped:
        main(["ppl", "--model", "/no/such/model", "--tokens", "2048", "--results", str(tmp_path)])
    err = capsys.readouterr().err
    assert stopped.value.code == 1
    assert err.splitlines() == ["bench ppl: error: model path not found or not a model: /no/such/model"], err


def test_a_value_error_is_one_line_and_other_errors_keep_their_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bench import band
    from bench.__main__ import main

    def raises(error: BaseException) -> Callable[[list[str]], None]:
        def command(argv: list[str]) -> None:
            raise error

        return command

    monkeypatch.setattr(band, "main", raises(ValueError("n_local 9000 is past the training length")))
    with pytest.raises(SystemExit) as stopped:
        main(["band"])
    assert stopped.value.code == 1
    assert capsys.readouterr().err == "bench band: error: n_local 9000 is past the training length\n"
    monkeypatch.setattr(band, "main", raises(KeyboardInterrupt()))
    with pytest.raises(SystemExit) as stopped:
        main(["band"])
    assert stopped.value.code == 130 and capsys.readouterr().err == "bench band: interrupted\n"
    monkeypatch.setattr(band, "main", raises(RuntimeError("a bug")))
    with pytest.raises(RuntimeError):
        main(["band"])


# ---- --help ----------------------------------------------------------------------------------------------------
def _first_paragraph(doc: str | None) -> str:
    return " ".join((doc or "").strip().split("\n\n")[0].split())


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_has_help_that_shows_its_default(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    module = _module(command)
    parser = module.build_parser()
    assert parser.description == _first_paragraph(module.__doc__)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings
        text = formatter._expand_help(action)  # the help as --help prints it
        assert "default" in text, (action.option_strings, text)
        assert text.count("(default") <= 1, (action.option_strings, text)  # not said twice
    with pytest.raises(SystemExit) as stopped:
        module.main(["--help"])
    assert stopped.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert _first_paragraph(module.__doc__) in out


def test_speed_one_and_cpu_skip_are_explained() -> None:
    one = next(a for a in _module("speed").build_parser()._actions if "--one" in a.option_strings)
    assert one.help and one.help != argparse.SUPPRESS
    skip = next(a for a in _module("cpu").build_parser()._actions if "--skip" in a.option_strings)
    assert skip.help and "cpu-<class>.json" in skip.help and "results" in skip.help


# ---- each command's results ------------------------------------------------------------------------------------
def _within(seconds: float, fn: Callable[[], object]) -> object:
    """``fn()``'s result or exception, failing the test if it has not returned after ``seconds`` (a loop that never
    ends must fail, not hang the suite)."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(fn())
        except Exception as error:
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still running after {seconds} s"
    return outcome[0]


def test_the_gpu_speed_plan_refuses_lengths_that_cannot_double() -> None:
    from bench import gpu

    for lengths, max_tokens in (([0], 1024), ([-1], 1024), ([128], 0)):
        plan = partial(gpu.speed_plan, lengths, max_tokens)
        assert isinstance(_within(5, plan), ValueError), (lengths, max_tokens)


def test_speed_without_a_memory_run_writes_null_not_nan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import speed

    timing = {"chunk_size": 0, "local_window": 0, "prefill_tok_s": 1000.0, "prefill_s": 1.5, "decode_tok_s": 20.0,
              "peak_gib": 0.5}  # fmt: skip
    monkeypatch.setattr(speed, "_subprocess_row", lambda *args: dict(timing))
    argv = ["--vanilla", "1536", "--patched", "1536", "--no-memory", "--results", str(tmp_path)]
    speed.main(argv)
    payload = _strict((tmp_path / "speed.json").read_text(encoding="utf-8"))
    assert payload["command"] == common.command_line("speed", argv) and payload["machine"]
    assert [(r["mode"], r["tokens"]) for r in payload["rows"]] == [("vanilla", 1536), ("lminf", 1536)]
    assert all(r["peak_gib"] is None for r in payload["rows"])
    table = (tmp_path / "speed.md").read_text(encoding="utf-8")
    assert "| 1.5K |" in table and f"Command: `{common.command_line('speed', argv)}`" in table


def test_passkey_json_holds_the_command_and_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import passkey

    titles: list[str] = []
    import matplotlib.figure

    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle", lambda self, text, **kw: titles.append(text))
    rows: list[dict[str, object]] = [
        {"method": "lambda", "length": 1536, "depth": 0.0, "correct": True, "answer": "", "key": "1"},
        {"method": "lambda", "length": 100, "depth": 0.0, "correct": False, "answer": "", "key": "2"},
    ]
    passkey.write_outputs(tmp_path, rows, [100, 1536], [0.0], "python -m bench passkey --model my/model", "my/model",
                          ["# title"])  # fmt: skip
    payload = _strict((tmp_path / "passkey.json").read_text(encoding="utf-8"))
    assert payload["command"] == "python -m bench passkey --model my/model" and payload["machine"]
    assert payload["rows"] == rows
    table = (tmp_path / "passkey.md").read_text(encoding="utf-8")
    assert "| method | 100 | 1.5K |" in table
    assert titles and "my/model" in titles[0] and "SmolLM2" not in titles[0]


def test_the_gpu_report_is_strict_json_with_its_command(tmp_path: Path) -> None:
    from bench import gpu

    report = gpu.Report("cpu", checks=[gpu.Check("llama: compiled decoding", "fp32", math.inf, 1e-5)])
    args = argparse.Namespace(results=tmp_path, argv=["--device", "cpu", "--quick"], time_limit=60.0, shape="tiny",
                              dtype="bf16", chunk=128, n_local=128, decode_steps=4, device="cpu")  # fmt: skip
    gpu._write(report, args)
    payload = _strict((tmp_path / "gpu.json").read_text(encoding="utf-8"))
    assert payload["command"] == "python -m bench gpu --device cpu --quick" and payload["machine"]
    assert payload["checks"][0]["error"] is None and payload["checks"][0]["ok"] is False


def test_the_cpu_report_holds_its_command_and_machine(tmp_path: Path) -> None:
    from bench import cpu

    cpu.write_report({"auto": "fp32", "cpu": "x"}, tmp_path, "python -m bench cpu --skip startup")
    payload = _strict((tmp_path / f"{cpu._report_name()}.json").read_text(encoding="utf-8"))
    assert payload["command"] == "python -m bench cpu --skip startup" and payload["machine"]
    assert cpu._previous_report(tmp_path)["auto"] == "fp32"  # --skip's reader still reads it


def test_decode_report_names_the_kernel_file_and_the_command() -> None:
    from bench import decode

    rows = [{"context": 1536.0, "eager_tok_s": 10.0, "compiled_tok_s": 20.0, "eager_flash_tok_s": 9.0,
             "compiled_flash_tok_s": 18.0}]  # fmt: skip
    args = argparse.Namespace(n_local=512, decode_steps=4, dtype="fp32")
    text = decode.report(rows, {"compile_s": 1.0, "compile_rss_gib": 0.1}, args, "python -m bench decode --n-local 512")
    assert "`lminf_integrations/ops/decode_kernel.py`" in text and "lminf_integrations/decode_kernel.py" not in text
    assert "Command: `python -m bench decode --n-local 512`" in text and "| 1.5K |" in text
    assert "lminf_integrations/ops/decode_kernel.py" in (decode.__doc__ or "")


def test_reuse_warms_up_before_either_timed_pass(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from bench import reuse

    calls: list[str] = []
    monkeypatch.setattr(reuse, "load_model", lambda *args: (object(), object()))
    monkeypatch.setattr(reuse, "token_ids", lambda tokenizer, n: [1] * n)
    monkeypatch.setattr(reuse, "Engine", lambda **kwargs: object())
    monkeypatch.setattr(reuse, "warm_up", lambda *args: calls.append("warm-up"))

    def ask_all(engine: object, document: list[int], questions: list[str]) -> list[float]:
        calls.append("timed")
        return [1.0] * len(questions)

    monkeypatch.setattr(reuse, "ask_all", ask_all)
    reuse.main(["--tokens", "64", "128", "--questions", "2", "--results", str(tmp_path)])
    assert calls == ["warm-up", "timed", "timed", "timed", "timed"]
    assert "Command: `python -m bench reuse --tokens 64 128 --questions 2 --results" in (
        tmp_path / "reuse.md").read_text(encoding="utf-8")  # fmt: skip


def test_the_ppl_plot_marks_the_models_training_length(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import ppl

    lines: list[float] = []
    import matplotlib.axes

    monkeypatch.setattr(matplotlib.axes.Axes, "axvline", lambda self, x=0, **kw: lines.append(x))
    ppl.plot({"vanilla (full context)": [2.0, 3.0]}, 2, tmp_path / "ppl.png", "tiny", training_length=2048)
    assert lines == [2.0]


def test_ragvs_full_vanilla_label_says_when_the_whole_document_fits() -> None:
    from bench import rag_vs_full

    assert "first 4096 tokens" in rag_vs_full.vanilla_label(4096, 16384, 8192)
    whole = rag_vs_full.vanilla_label(2000, 2000, 8192)
    assert "whole document" in whole and "first" not in whole


def test_a_one_measurement_subprocess_does_not_check_the_results_folder() -> None:
    """``speed --one`` and ``cpu --one`` run in subprocesses of a run and write nothing: the parent's ``--results``
    (not passed down) was checked, and the default folder may not be writable where the parent's is."""
    from bench import cpu, speed

    assert speed.build_parser().parse_args(["--one", "lminf", "64", "--results", "/dev/null/x"]).one == ["lminf", "64"]
    assert cpu.build_parser().parse_args(["--one", "load", "--results", "/dev/null/x"]).one == ["load"]
