"""``python -m bench <command> [options]``: every benchmark writes a markdown table (and a PNG plot where it has
one) to ``bench/results/`` and prints the table.

Commands:
    ppl          perplexity by position bucket, vanilla vs LM-Infinite, on any text file
    passkey      passkey retrieval over lengths × depths, vanilla vs Λ-only vs Λ + top-k (heatmap)
    rag-vs-full  the same questions answered by full context, vector RAG, BM25 RAG and truncated vanilla
    speed        prefill/decode tokens/s and memory, vanilla vs LM-Infinite
    decode       decoding tokens/s through generate, eager vs compiled (compile_decode)
    reuse        many questions about one document, with and without reuse of its encoded state
    band         the Λ band's kernel time by layout and query-block size (how the layout was chosen)
    cpu          start-up, dtype choice and prefill ratio on this CPU class (AMX, AVX-512 BF16, AVX2)
    gpu          the GPU check: every strategy exact on CUDA, speed and memory of a large shape, a split model

``python -m bench <command> --help`` lists each command's options; every command takes ``--results DIR``.
A bad argument is refused before anything loads (exit status 2); an error a person can fix at run time (a file or
model that is not there, a setting the package refuses) is one line, ``bench <command>: error: ...`` (exit status 1).
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "ppl": "bench.ppl",
    "passkey": "bench.passkey",
    "rag-vs-full": "bench.rag_vs_full",
    "speed": "bench.speed",
    "decode": "bench.decode",
    "reuse": "bench.reuse",
    "band": "bench.band",
    "cpu": "bench.cpu",
    "gpu": "bench.gpu",
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        if argv and argv[0] not in ("-h", "--help"):
            sys.exit(f"unknown command {argv[0]!r}; choose one of: {', '.join(COMMANDS)}")
        return
    name = argv[0]
    try:
        result = importlib.import_module(COMMANDS[name]).main(argv[1:])
    except KeyboardInterrupt:
        print(f"bench {name}: interrupted", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError) as error:
        # What a person can fix (a missing file, a model that does not load, a setting the package refuses) reads
        # better as its message than as a traceback; anything else is a bug and keeps its traceback.
        print(f"bench {name}: error: {error}", file=sys.stderr)
        sys.exit(1)
    if getattr(result, "ok", True) is False:  # a check's report (bench gpu): a failure fails the command
        sys.exit(1)


if __name__ == "__main__":
    main()
