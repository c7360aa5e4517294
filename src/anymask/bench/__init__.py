"""``anymask bench``: every backend side by side, timed right, on a grid of cases.

    cases.py       the grid: frozen ``Case`` records, default grids, config files, bench masks
    inputs.py      rotating input sets (fresh tensors so caches don't flatter)
    reference.py   float64 reference output and gradients, chunked (no S x S x H in fp64)
    variants.py    what is timed: each anymask backend forced, ``auto``, the raw calls users write
    timing.py      first call apart, warm-up, round-robin samples, device events, medians
    errors.py      max error against the reference, and who is eligible to win
    choose.py      measure the backends of one problem and pick the fastest correct one (tuning)
    runner.py      the loop over cases, producing ``Row`` records
    report.py      table on stdout, CSV, JSON, summary line;  plot.py  one PNG per mask kind
    env.py         device name, library versions, git commit, date
    cli.py         ``register(subparsers)``: the ``bench`` and ``tune`` subcommands

Nothing here is imported by ``anymask`` itself; ``anymask.tuning`` imports ``choose`` lazily,
only when it measures.
"""
