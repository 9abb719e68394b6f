"""The benchmark (the project's main job): ``rlvr-bench`` / ``python -m rlvr_kernels.bench``.

Modules: :mod:`~rlvr_kernels.bench.cli` (the command line, output folder, meta.json),
:mod:`~rlvr_kernels.bench.cases` (ops, implementations, loss cases from :mod:`rlvr_kernels.methods`, how one point
is built), :mod:`~rlvr_kernels.bench.timing` (warm-up, repeats, median / IQR, peak memory),
:mod:`~rlvr_kernels.bench.runner` (the plan, child processes, records and ratios),
:mod:`~rlvr_kernels.bench.report` (results.json / .csv / .md), :mod:`~rlvr_kernels.bench.plots` (PNG plots) and
:mod:`~rlvr_kernels.bench.readme_table` (the README's results block).

Importing this package imports no peer and runs nothing; ``main(argv)`` runs the benchmark. What it measures and
how, the output folder and meta.json: docs/benchmark.md.
"""


def main(argv=None, **kw) -> int:
    """Run the benchmark with command-line arguments ``argv`` (see ``rlvr-bench --help``); returns the exit code."""
    from rlvr_kernels.bench.cli import main as _main

    return _main(argv, **kw)


__all__ = ["main"]
