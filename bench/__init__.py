"""babysit's benchmark suite: ``python -m bench`` (full) or ``python -m bench --quick``.

See bench/README.md for what is measured and how; bench/RESULTS.md holds the latest full run.
"""
