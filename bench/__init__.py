"""Benchmarks and evaluations: ``python -m bench <command>`` from the repository root (see ``bench/__main__.py``)."""
