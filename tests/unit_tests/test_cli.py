"""The `lminf` command: argument errors, unreadable files, and a real streamed run on a tiny saved model."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase

from lminf_integrations.cli import build_parser, main
from tests.tiny_models import tiny_llama

OPTIONS = [
    "--model",
    "--dtype",
    "--max-new-tokens",
    "--temperature",
    "--top-p",
    "--seed",
    "--stop",
    "--n-global",
    "--n-local",
    "--distance-limit",
    "--top-k",
    "--top-k-from-layer",
    "--cache-mode",
    "--chunk-size",
    "--no-progress",
    "--state",
    "--compile-decode",
    "--model-id",
    "--max-tokens",
]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "lminf_integrations", *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_help_lists_every_option() -> None:
    ask = build_parser()._subparsers._group_actions[0].choices["ask"]  # type: ignore[union-attr]
    text = ask.format_help()
    for option in OPTIONS:
        assert option in text


def test_console_script_help() -> None:
    result = _run("ask", "--help")
    assert result.returncode == 0
    assert "--max-new-tokens" in result.stdout


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "no such file"),
        (b"\x00\x01binary", "looks binary"),
        (b"text " * 4000 + b"\x00\x01binary", "looks binary"),  # a NUL past the first 8 KB too
        (b"caf\xe9 au lait", "not valid UTF-8"),
        (b" \n\t\n", "is empty"),  # nothing to read: an answer would come from the model alone
    ],
)
def test_unreadable_files_are_reported(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "doc.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as error:
        main(["ask", str(path), "question?"])
    assert message in str(error.value)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--max-new-tokens", "0"], "max_new_tokens must be an int >= 1"),
        (["--cache-mode", "paged"], "invalid choice"),
        (["--top-k", "4"], "top_k > 0 needs cache_mode='full'"),  # checked by the engine's own dataclasses
    ],
)
def test_argument_errors(tmp_path: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "doc.txt"
    path.write_text("hello")
    with pytest.raises(SystemExit) as error:
        main(["ask", str(path), "q", *extra])
    assert error.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.startswith("usage: lminf ask FILE QUESTION"), err  # the command's usage, not the program's


@pytest.mark.parametrize("typed", ["--n-locl", "--n-loc"])
def test_a_misspelt_or_shortened_option_is_refused_naming_the_closest(
    tmp_path: Path, typed: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """As the Python classes refuse n_locl=: the closest option named; a prefix is not taken as the option (argparse
    would read --n-loc as --n-local, and a later option could make it ambiguous)."""
    path = tmp_path / "doc.txt"
    path.write_text("hello")
    with pytest.raises(SystemExit) as error:
        main(["ask", str(path), "q", typed, "5"])
    assert error.value.code == 2
    err = capsys.readouterr().err
    assert f"unrecognized arguments: {typed} 5" in err and "did you mean --n-local?" in err, err


def test_an_empty_question_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "doc.txt"
    path.write_text("hello")
    with pytest.raises(SystemExit):
        main(["ask", str(path), "  "])
    assert "the question is empty" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["/no/such/model/folder", "doc.txt"])
def test_a_model_that_does_not_load_is_an_error_not_a_traceback(tmp_path: Path, model: str) -> None:
    """What a person typed wrong (a missing folder, a text file as the model) is said in one line, as argument
    errors are."""
    path = tmp_path / "doc.txt"
    path.write_text("hello")
    with pytest.raises(SystemExit) as error:
        main(["ask", str(path), "q", "--model", model if model.startswith("/") else str(path)])
    assert str(error.value).startswith("lminf: error: ")


def test_a_missing_state_file_is_said_before_the_model_loads(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as error:
        main(["ask", "--state", str(tmp_path / "missing.lminf"), "q", "--model", "/no/such/model/folder"])
    assert str(error.value) == f"lminf: error: no such state file: {tmp_path / 'missing.lminf'}"


@pytest.mark.parametrize("target", ["a folder", "a missing folder", "a file's name as folder", "an unwritable folder"])
def test_encode_checks_where_it_writes_before_it_reads(tmp_path: Path, target: str) -> None:
    """An output path that cannot be written is refused before the model loads and the document is read (minutes
    for a book), and nothing is left behind."""
    path = tmp_path / "doc.txt"
    path.write_text("hello")
    output = {
        "a folder": tmp_path,
        "a missing folder": tmp_path / "missing" / "doc.lminf",
        "a file's name as folder": path / "doc.lminf",
        "an unwritable folder": Path("/proc/doc.lminf"),  # no file can be made there, even by root
    }[target]
    with pytest.raises(SystemExit) as error:
        main(["encode", str(path), "-o", str(output), "--model", "/no/such/model/folder"])
    assert str(error.value).startswith("lminf: error: ") and str(output) in str(error.value)
    assert "no folder" not in str(error.value) or target == "a missing folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.txt"]


@pytest.mark.parametrize(
    "given", [["--candidates", "3"], ["--hop-margin", "none"], ["--score", "entropy"], ["--question-tokens", "9"]]
)
def test_encode_refuses_what_only_a_question_uses(
    tmp_path: Path, given: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A state keeps what encoding fixes; a setting read only when a question is asked would be dropped silently:
    it is refused, before the model loads, saying where it belongs."""
    path = tmp_path / "doc.txt"
    path.write_text("hello")
    with pytest.raises(SystemExit):
        main(["encode", str(path), "-o", str(tmp_path / "d.lminf"), "--strategy", "xl3m", *given,
              "--model", "/no/such/model/folder"])  # fmt: skip
    err = capsys.readouterr().err
    assert given[0].removeprefix("--").replace("-", "_") + "=" in err and "lminf ask --state" in err, err
    assert "/no/such/model" not in err


def test_encode_help_lists_only_what_a_state_keeps() -> None:
    """``encode --help`` offers the settings a state keeps (XL3M's segment size) and not those read when a question
    is asked (the selection's), which it would refuse; it says where those go."""
    encode = build_parser()._subparsers._group_actions[0].choices["encode"]  # type: ignore[union-attr]
    help_text = encode.format_help()
    listed = {line.split()[0] for line in help_text.splitlines() if line.startswith("  --")}
    assert {"--segment-tokens", "--n-local", "--dca-chunk-size"} <= listed
    assert not {"--candidates", "--score", "--passage-tokens", "--hop-margin", "--question-tokens"} & listed
    assert "lminf ask --state" in " ".join(help_text.split())


SMALL = ["--max-new-tokens", "8", "--n-local", "512", "--chunk-size", "1024", "--dtype", "fp32"]


def test_streams_an_answer_with_progress(tmp_path: Path, tiny_model_dir: Path) -> None:
    document = tmp_path / "doc.txt"
    document.write_text("The quick brown fox jumps over the lazy dog. " * 400)  # ~4K tokens
    result = _run("ask", str(document), "What jumps?", "--model", str(tiny_model_dir), *SMALL, "--progress")
    assert result.returncode == 0, result.stderr
    assert "encoding" in result.stderr and "tok" in result.stderr  # the tqdm bar
    assert "generated" in result.stderr  # the closing summary
    assert result.stdout.strip()  # some answer text (random weights: its content is meaningless)


def test_compiled_decoding_gives_the_same_answer(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The compiled run is a fresh process with an empty inductor cache, as on a user's first run; the eager
    answer it must equal runs in this process."""
    document = tmp_path / "doc.txt"
    document.write_text("The quick brown fox jumps over the lazy dog. " * 200)  # ~2K tokens: past the window
    settings = [*SMALL, "--max-new-tokens", "12", "--no-progress"]
    assert main(["ask", str(document), "What jumps?", "--model", str(tiny_model_dir), *settings]) == 0
    eager = capsys.readouterr()
    compiled = _run(
        "ask", str(document), "What jumps?", "--model", str(tiny_model_dir), *settings, "--compile-decode",
        env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")},
    )  # fmt: skip
    assert compiled.returncode == 0, compiled.stderr
    assert compiled.stdout == eager.out and eager.out.strip()
    # A first compile writes nothing of its own: inductor's GEMM timing tables and its statistics of the choices
    # ("Autotune Choices Stats"), and torch's warnings from inside the compiler, are not the user's business.
    assert "autotune" not in compiled.stderr.lower() and "Warning:" not in compiled.stderr, compiled.stderr
    assert "Loading weights" not in compiled.stderr  # --no-progress: no bar at all, transformers' loading bar neither


def test_running_out_of_memory_is_one_line_saying_what_to_change() -> None:
    """The memory check counts the cache, not every working buffer: where an allocation still fails (a tight
    ``ulimit -v``, a GPU), lminf says so in one line with what to change, as for the check's own refusal."""
    import torch

    from lminf_integrations.cli import out_of_memory_message

    try:
        torch.empty(2**50, dtype=torch.uint8)  # torch's own allocator failure, as under a memory limit
    except RuntimeError as error:
        message = out_of_memory_message(error)
    assert message is not None and message.startswith("out of memory")
    assert "--cache-mode window" in message and "smaller document" in message
    assert out_of_memory_message(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None


def test_ctrl_c_while_encoding_ends_in_one_line_and_leaves_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Ctrl-C stops an encode at its next chunk: the command waits for that, so no model work is left running while
    the interpreter exits (that aborted the process: 'terminate called without an active exception'), and says so
    in one line with the shell's exit status for SIGINT, 130."""
    document = tmp_path / "doc.txt"
    document.write_text("The quick brown fox jumps over the lazy dog. " * 60000)  # ~600K tokens: seconds to encode
    out = tmp_path / "out"
    out.mkdir()
    command = [sys.executable, "-m", "lminf_integrations", "encode", str(document), "-o", str(out / "doc.lminf")]
    command += ["--model", str(tiny_model_dir), "--n-local", "512", "--chunk-size", "256", "--dtype", "fp32"]
    process = subprocess.Popen(
        [*command, "--progress"], stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        # As typed at a terminal: a test runner started in the background (`cmd &`) passes SIGINT on ignored, and
        # Python then never turns it into KeyboardInterrupt.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    assert process.stderr is not None
    seen = ""
    while "%" not in seen.partition("encoding")[2]:  # the bar is drawn: encoding has begun
        character = process.stderr.read(1)
        assert character, f"ended before encoding: {seen[-2000:]}"
        seen += character
    process.send_signal(signal.SIGINT)
    rest = process.stderr.read()
    assert process.wait(60) == 130, rest[-3000:]
    assert "Traceback" not in rest and "terminate called" not in rest
    assert rest.strip().splitlines()[-1] == "lminf: interrupted"
    assert list(out.iterdir()) == []


@pytest.fixture(scope="module")
def plain_tokenizer(default_tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A tokenizer with no chat template that starts texts with BOS, as a base Llama's does."""
    tokenizer = copy.deepcopy(default_tokenizer)
    tokenizer.chat_template = None
    tokenizer.add_bos_token = True
    return tokenizer


@pytest.fixture(scope="module")
def plain_model_dir(plain_tokenizer: PreTrainedTokenizerBase, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model folder whose tokenizer has no chat template (a base model)."""
    folder = tmp_path_factory.mktemp("tiny-base-model")
    tiny_llama(plain_tokenizer).save_pretrained(folder)
    plain_tokenizer.save_pretrained(folder)
    return folder


def test_a_model_without_a_chat_template_is_asked_in_plain_text(plain_tokenizer: PreTrainedTokenizerBase) -> None:
    """A base model has no chat template: the question is asked as plain text after the document, led by the
    tokenizer's BOS, and the answer follows "Answer:"."""
    from lminf_integrations.cli import _split_prompt
    from lminf_integrations.engine import Engine

    engine = Engine(model=tiny_llama(plain_tokenizer), tokenizer=plain_tokenizer, reuse_prefixes=False)
    head, instruction, question, closing = _split_prompt(engine, "Alice met Bob.", "Who did Alice meet?")
    assert head == [plain_tokenizer.bos_token_id, *engine.tokenize("Alice met Bob.")]
    text = plain_tokenizer.decode(head[1:] + instruction + question + closing)
    expected = "Alice met Bob.\n\nAnswer the question about the document above.\nQuestion: Who did Alice meet?\nAnswer:"
    assert text == expected


def test_a_base_model_answers_from_its_state_as_directly(
    tmp_path: Path, plain_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The plain-text prompt of a model without a chat template splits as the chat one does: its document part,
    BOS included, is a state that ``ask --state`` continues to the same answer (in this process: no start-up)."""
    document = tmp_path / "doc.txt"
    document.write_text("Alice met Bob at the station. " * 100)
    state = tmp_path / "doc.lminf"
    settings = ["--model", str(plain_model_dir), *SMALL, "--no-progress"]
    assert main(["encode", str(document), "-o", str(state), *settings[:2], *SMALL[2:], "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["ask", str(document), "Who?", *settings]) == 0
    direct = capsys.readouterr().out
    assert main(["ask", "--state", str(state), "Who?", *settings]) == 0
    assert capsys.readouterr().out == direct and direct.strip()


@pytest.mark.parametrize(
    "strategy",
    [[], ["--strategy", "dca", "--dca-chunk-size", "256", "--dca-local-window", "64"]],
    ids=["lm-inf", "dca"],
)
def test_encode_once_then_ask_from_the_state(
    tmp_path: Path, tiny_model_dir: Path, strategy: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """In this process (the command's own behaviour; start-up and exit are tested by the runs above)."""
    document = tmp_path / "doc.txt"
    document.write_text("Alice met Bob at the station. " * 150)  # ~1,000 tokens: four DCA chunks of 256
    state = tmp_path / "doc.lminf"
    model = ["--model", str(tiny_model_dir), *strategy, "--no-progress"]
    small = SMALL if not strategy else ["--max-new-tokens", "8", "--dtype", "fp32"]  # n_local: LM-Infinite's
    assert main(["encode", str(document), "-o", str(state), *model, *small[2:]]) == 0
    assert state.is_file()
    capsys.readouterr()
    assert main(["ask", str(document), "Who?", *model, *small]) == 0
    direct = capsys.readouterr().out
    assert main(["ask", "--state", str(state), "Who?", *model, *small]) == 0
    assert capsys.readouterr().out == direct and direct.strip()
    other = ["--dca-chunk-size", "128"] if strategy else ["--n-global", "2"]
    with pytest.raises(SystemExit) as refused:
        main(["ask", "--state", str(state), "Who?", *model, *small, *other])
    differs = "dca_chunk_size: file 256, now 128" if strategy else "n_global: file 10, now 2"
    assert differs in str(refused.value), refused.value


def test_chat_template_arguments_are_given_as_json(tmp_path: Path) -> None:
    from lminf_integrations.cli import ASK_GROUPS, _settings

    parser = build_parser()
    args = parser.parse_args(["ask", "doc.txt", "q", "--chat-template-kwargs", '{"enable_thinking": false}'])
    assert _settings(args, parser, ASK_GROUPS).options.chat_template_kwargs == {"enable_thinking": False}


def test_special_token_text_in_a_document_or_question_stays_text(
    tiny_llama_with_real_tokenizer: tuple[object, PreTrainedTokenizerBase], plain_tokenizer: PreTrainedTokenizerBase
) -> None:
    """A code base may hold the chat template's own markers as text ("<|im_end|>" in a Python string): read as the
    special tokens, they would end the user's turn in the middle of the document. The file and the question are
    read as text; only the template's own markup gives special tokens. A document without such text gets the
    tokens it always had (saved states stay valid)."""
    from lminf_integrations.cli import _split_prompt
    from lminf_integrations.engine import Engine

    model, tokenizer = tiny_llama_with_real_tokenizer
    engine = Engine(model=model, tokenizer=tokenizer, reuse_prefixes=False)  # type: ignore[arg-type]
    special = set(tokenizer.all_special_ids) | {int(i) for i in tokenizer.added_tokens_decoder}

    def specials(ids: list[int]) -> list[int]:
        return [i for i in ids if i in special]

    plain_head, *plain_rest = _split_prompt(engine, "Alice met Bob.", "Who did Alice meet?")
    document = 'END = "<|im_end|>"\nSTART = "<|im_start|>assistant"  # <filename> too\n'
    head, instruction, question, closing = _split_prompt(engine, document, "What is <|im_end|> here?")
    assert specials(head) == specials(plain_head) and specials(question) == []
    assert tokenizer.decode(head).endswith(document)
    assert [instruction, closing] == [plain_rest[0], plain_rest[2]]
    # an ordinary document: the tokens of the whole opening, as before
    opening = engine.chat_prompt([{"role": "user", "content": "Alice met Bob." + "\0"}]).split("\0")[0]
    assert plain_head == engine.tokenize(opening)
    # a base model's plain-text prompt too: its BOS is the one special token
    base = Engine(model=tiny_llama(plain_tokenizer), tokenizer=plain_tokenizer, reuse_prefixes=False)
    head, _, question, _ = _split_prompt(base, 'BOS, EOS = "<|im_start|>", "<|endoftext|>"', "Why <|im_start|>?")
    assert base.tokenize(plain_tokenizer.bos_token) == [plain_tokenizer.bos_token_id]  # the string spells the BOS
    assert [i for i in head + question if i in plain_tokenizer.all_special_ids] == [plain_tokenizer.bos_token_id]


def test_a_document_piped_in_as_dash_is_read_from_stdin(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cat src/*.py | lminf ask - "..."``: the usual "-" for standard input, for ask and encode, with the checks a
    file gets; the answer is the one the same text in a file gets."""
    import io

    text = "Alice met Bob at the station. " * 20
    document = tmp_path / "doc.txt"
    document.write_text(text)
    settings = ["--model", str(tiny_model_dir), *SMALL, "--no-progress"]

    def stdin(data: bytes) -> None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))

    assert main(["ask", str(document), "Who?", *settings]) == 0
    from_file = capsys.readouterr().out
    stdin(text.encode())
    assert main(["ask", "-", "Who?", *settings]) == 0
    assert capsys.readouterr().out == from_file and from_file.strip()
    stdin(text.encode())
    state = tmp_path / "doc.lminf"
    assert main(["encode", "-", "-o", str(state), *settings[:2], *SMALL[2:], "--no-progress"]) == 0
    assert main(["ask", "--state", str(state), "Who?", *settings]) == 0
    assert capsys.readouterr().out.endswith(from_file)
    for data, message in ((b"", "standard input is empty"), (b"caf\xe9", "standard input is not valid UTF-8")):
        stdin(data)
        with pytest.raises(SystemExit, match=message):
            main(["ask", "-", "Who?", *settings])


def test_a_named_pipe_is_read_like_a_file(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``lminf ask <(cat src/*.py) "..."`` and ``/dev/stdin`` name a pipe, not a regular file: read it (a directory
    is still refused)."""
    import threading

    text = "Alice met Bob at the station. " * 20
    document = tmp_path / "doc.txt"
    document.write_text(text)
    settings = ["--model", str(tiny_model_dir), *SMALL, "--no-progress"]
    assert main(["ask", str(document), "Who?", *settings]) == 0
    from_file = capsys.readouterr().out
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text(text))
    writer.start()
    assert main(["ask", str(fifo), "Who?", *settings]) == 0
    writer.join()
    assert capsys.readouterr().out == from_file
    with pytest.raises(SystemExit, match="is a directory"):
        main(["ask", str(tmp_path), "Who?", *settings])


@pytest.mark.parametrize("command", ["ask", "encode"])
def test_several_files_are_refused_saying_how_to_give_them(
    tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A glob (``lminf ask src/*.py "..."``) gives several files: one document is read, so say how to join them."""
    files = [tmp_path / f"{name}.py" for name in ("a", "b")]
    for file in files:
        file.write_text("x = 1\n")
    extra = ["Where?"] if command == "ask" else ["-o", str(tmp_path / "x.lminf")]
    with pytest.raises(SystemExit) as error:
        main([command, *map(str, files), *extra])
    assert error.value.code == 2
    assert "cat FILES | lminf " in capsys.readouterr().err


def test_a_direct_ask_reads_the_document_in_the_chunks_of_encode_then_ask_state(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``ask FILE`` and ``encode FILE`` + ``ask --state`` must give the same answer: in bf16 a chunk that spans the
    document's end rounds otherwise than two chunks split there, and a greedy answer can flip. So a direct ask also
    ends a chunk where the document ends: the model sees the same chunks either way."""
    from lminf_integrations.models import load_model

    document = tmp_path / "doc.txt"
    document.write_text("Alice met Bob at the station. " * 100)  # ~700 tokens: the document ends mid-chunk
    settings = ["--model", str(tiny_model_dir), "--n-local", "512", "--chunk-size", "256", "--dtype", "fp32"]
    model, _ = load_model(str(tiny_model_dir), "fp32")  # the copy the commands use (one per process)
    chunks: list[int] = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: chunks.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        assert main(["ask", str(document), "Who?", *settings, "--max-new-tokens", "2", "--no-progress"]) == 0
        direct = list(chunks)
        chunks.clear()
        state = tmp_path / "doc.lminf"
        assert main(["encode", str(document), "-o", str(state), *settings, "--no-progress"]) == 0
        assert main(["ask", "--state", str(state), "Who?", *settings, "--max-new-tokens", "2", "--no-progress"]) == 0
    finally:
        hook.remove()
    capsys.readouterr()
    assert direct == chunks and len(direct) > 4, (direct, chunks)
