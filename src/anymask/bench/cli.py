"""``anymask bench`` and ``anymask tune``: ``register(subparsers)`` adds both to a CLI.

Cases come from a default grid (``--grid quick|cpu|gpu``; ``--quick``), then a config file
(``--config cases.toml`` / ``.json``), then the command-line options, each overriding the last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

from .._optional import probe
from ..cli import positive_int
from .cases import GRIDS, expand, grid_dict, load_config, override_parts
from .timing import Settings

SETTINGS = {
    "quick": Settings(warmup=1, rounds=3, budget_s=0.03, max_iters=12, min_iters=3),
    "cpu": Settings(warmup=1, rounds=3, budget_s=0.25, max_iters=60, min_iters=3),
    "gpu": Settings(warmup=3, rounds=5, budget_s=0.25, max_iters=100, min_iters=10),
}
BENCH_HELP = """Every available backend forced, auto, and the raw calls users write today (SDPA with a
dense mask, compiled FlexAttention), side by side on a grid of cases.  Per row: median and p20-p80
time, TFLOP/s over visible pairs only, first-call (compile) time, peak CUDA memory, max error
against a float64 reference.  Writes <out>/<tag>.csv, <tag>.json and one PNG per mask kind
(<mask>.png; <tag>-<mask>.png when --tag is not "bench"); prints
the tables and, last, one JSON summary line.

Cases: a default grid (--grid quick|cpu|gpu, --quick), then --config FILE (JSON/TOML with the
option names below), then the options, each overriding the last.  A grid's extra parts (cpu: GQA
4:1 at S 1024 fwd+bwd; gpu: fp32 fwd+bwd, S 16384, GQA 32:8 fwd+bwd) are dropped when an option
sets what they vary (cpu GQA: --heads or --seqlens; gpu: --dtypes, --seqlens, --heads): --seqlens
64 on the cpu grid gives S 64 with 4 heads, both passes, only; --passes keeps every part."""
_GRID_OPTIONS = ("masks", "seqlens", "dtypes", "passes", "head_dims", "heads", "batch", "tokens")


def _add_grid_options(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group()
    which.add_argument("--grid", choices=sorted(GRIDS), help="default grid (default: gpu with CUDA, else cpu)")
    which.add_argument("--quick", action="store_true", help="the tiny CI grid (under a minute on CPU): --grid quick")
    p.add_argument("--config", metavar="FILE",
                   help="JSON or (Python 3.11+) TOML file of grid and the grid options below (masks, seqlens, "
                        "dtypes, passes, head_dims, heads, batch, tokens; for bench also backends); "
                        "command-line options override it")
    p.add_argument("--masks", help="comma list of catalogue masks (full,causal,padding,documents,...)")
    p.add_argument("--seqlens", help="comma list of sequence lengths")
    p.add_argument("--dtypes", help="comma list of bf16,fp16,fp32")
    p.add_argument("--passes", help="comma list of fwd,fwd+bwd (bwd or train: fwd+bwd, a backward is timed "
                                    "with its forward)")
    p.add_argument("--head-dims", dest="head_dims", help="comma list of head dims")
    p.add_argument("--heads", help="comma list of query heads, or q:kv for GQA (e.g. 16,32:8)")
    p.add_argument("--batch", type=positive_int, help="batch size (default: tokens // seq)")
    p.add_argument("--tokens", type=positive_int, help="tokens per step when --batch is not given")
    p.add_argument("--device", help="cpu or cuda[:i] (default: cuda when available)")
    p.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: torch's own choice)")


def positive_seconds(text: str) -> float:
    """argparse type: a finite number of seconds above 0 (a clear usage error otherwise)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number of seconds above 0")
    return value


def _usage_error(command: str, message: str) -> SystemExit:
    """Exit 2 with ``anymask <command>: error: <message>``, as argparse does for its own checks."""
    print(f"anymask {command}: error: {message}", file=sys.stderr)
    return SystemExit(2)


def _device(name: str | None) -> torch.device:
    """``--device``: a bad name or a missing GPU raises ``ValueError`` (a usage error, not a traceback)."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r}: cpu or cuda[:i]") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: cpu or cuda[:i]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: this torch build sees no CUDA GPU")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name!r}: there are {torch.cuda.device_count()} CUDA devices")
    return device


def _resolve(args) -> tuple[str, object, list, dict, torch.device]:
    """Grid name, grids, their expanded cases, the config file's other options, device; every bad
    option (unknown mask, dtype, heads, a config file that is missing or malformed) is a usage error."""
    try:
        return _resolve_checked(args)
    except (ValueError, OSError) as exc:
        raise _usage_error(args.command, str(exc)) from None


def _resolve_checked(args) -> tuple[str, object, list, dict, torch.device]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    config = load_config(args.config) if args.config else {}
    name = "quick" if args.quick else (args.grid or config.pop("grid", None) or
                                      ("gpu" if device.type == "cuda" else "cpu"))
    config.pop("grid", None)
    unknown = sorted(set(config) - set(_GRID_OPTIONS) - {"backends"})
    if unknown:
        raise ValueError(f"{args.config}: unknown option(s) {', '.join(unknown)}; a config file takes grid, "
                         f"backends, {', '.join(_GRID_OPTIONS)}")
    if name not in GRIDS:
        raise ValueError(f"unknown grid {name!r}; choose from {', '.join(GRIDS)}")
    from_file = {k: v for k, v in config.items() if k in _GRID_OPTIONS}
    from_args = {k: getattr(args, k) for k in _GRID_OPTIONS}
    grids = override_parts(name, from_file, from_args)
    return name, grids, expand(grids), config, device


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def plot_prefix(tag: str) -> str:
    """What the plots of a run tagged ``tag`` start with: nothing for the default tag ``bench``."""
    return "" if tag == "bench" else f"{tag}-"


def _plot(rows, out: Path, meta: dict) -> list[Path]:
    """The PNGs drawn, named with ``meta["plot_prefix"]`` (none without matplotlib)."""
    from .._optional import MissingDependency
    from .plot import plot_masks

    try:
        inputs = ", inputs [B, S, H, D] in memory" if meta.get("layout") == "bshd" else ""
        return plot_masks(rows, out, title=f"{meta['device']}, torch {meta['torch']}{inputs}",
                          prefix=meta.get("plot_prefix", ""))
    except MissingDependency as exc:
        print(f"anymask bench: no plots ({exc}); later: anymask bench --plot-only {out}", file=sys.stderr)
        return []


def _remove_stale_plots(out: Path, tag: str, earlier: dict, drawn: list[Path]) -> None:
    """Remove the plots of ``earlier`` (the ``<tag>.json`` this run replaced) that this run did not
    redraw: beside the new results they would show numbers no longer in them.  Only where ``earlier``
    recorded this tag's prefix (results from before it did may share ``<mask>.png`` with another tag)."""
    prefix = earlier.get("meta", {}).get("plot_prefix")
    if prefix != plot_prefix(tag):
        return
    for mask in sorted({r["mask"] for r in earlier.get("rows", ())}):
        png = out / f"{prefix}{mask}.png"
        if png not in drawn and png.is_file():
            png.unlink()


def _read_results(file: Path) -> dict:
    """A bench result's JSON document, or ``{}`` when ``file`` is unreadable or something else."""
    try:
        doc = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    if not (isinstance(doc, dict) and isinstance(doc.get("meta"), dict) and isinstance(doc.get("rows"), list)
            and "summary" in doc):
        return {}
    bench_rows = all(isinstance(r, dict) and {"mask", "variant", "status"} <= r.keys() for r in doc["rows"])
    return doc if bench_rows else {}  # training results and others share the rows/meta shape


def _plot_only(path: Path, out_dir: Path | None = None, plots: bool = True) -> int:
    """Plots, CSV and the summaries again from an earlier run's JSON rows: ``--plot-only DIR_OR_JSON``,
    written beside each JSON (which is rewritten with today's summaries), or into ``out_dir``."""
    from . import report
    from .runner import Row

    if not path.exists():
        raise SystemExit(f"anymask bench --plot-only: no such file or directory: {path}")
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    docs = {file: _read_results(file) for file in files}
    docs = {file: doc for file, doc in docs.items() if doc}  # bench results only
    if not docs:
        raise SystemExit(f"anymask bench --plot-only: no bench results (JSON with rows and meta) in {path}")
    status = 0
    if plots and isinstance(probe("matplotlib"), str):  # the CSV and summaries are still recomputed
        print(f"anymask bench: no plots ({probe('matplotlib')})", file=sys.stderr)
        plots, status = False, 1
    for file, doc in docs.items():
        rows = [Row(**{("mode" if k == "pass" else k): v for k, v in r.items()}) for r in doc["rows"]]
        out = _made_dir(out_dir or file.parent)
        target = file if out_dir is None else out / file.name
        meta = doc["meta"]
        if "plot_prefix" not in meta:  # results from before plots followed --tag: drawn in place as then
            legacy = "" if len(docs) == 1 else plot_prefix(file.stem)  # (if alone), and left unrecorded
            meta = dict(meta, plot_prefix=legacy)  # but for the default tag, whose prefix it is
            if file.stem == "bench":
                doc["meta"] = meta
        if plots:
            _plot(rows, out, meta)
        cases = report.case_summaries(rows)
        keep = {k: v for k, v in doc["summary"].items() if k in ("device", "grid", "seconds")}
        line = report.summary(rows, cases, doc["summary"].get("out", str(file.parent)), **keep)
        report.write_csv(rows, target.with_suffix(".csv"))
        report.write_json(rows, cases, doc["meta"], line, target)
        print(report.summary_table(cases))
        print(json.dumps(line))
    return status


_SOFTWARE = ("torch", "triton", "anymask", "cuda", "cudnn", "settings", "input_sets")  # merged parts should agree
_CASE_FIELDS = ("mask", "batch", "seq", "heads", "kv_heads", "head_dim", "dtype", "pass")


def _merge(files: list[str], out: Path, tag: str, plots: bool = True) -> int:
    """One result from the parts of a grid run separately (e.g. one part per GPU): rows
    concatenated, meta of the first part with every part's grid options, date and commit.  A case
    measured in several parts keeps the rows of the last one, so a re-run of some cases (after a
    change) replaces them in an earlier merged result: ``--merge old.json rerun.json`` (all of a
    case's rows: a re-run with fewer ``--backends`` drops the others).  Cases a part never started
    replace nothing."""
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise SystemExit(f"anymask bench --merge: no such file: {', '.join(missing)}")
    docs = [_read_results(Path(f)) for f in files]
    bad = [f for f, d in zip(files, docs) if not d]
    if bad:
        raise SystemExit(f"anymask bench --merge: not bench results: {', '.join(bad)}")
    devices = {d["meta"]["device"] for d in docs}
    if len(devices) > 1:
        raise SystemExit(f"anymask bench --merge: parts from different devices: {', '.join(sorted(devices))}")
    layouts = {d["meta"].get("layout", "bhsd") for d in docs}
    if len(layouts) > 1:
        raise SystemExit(f"anymask bench --merge: parts with different input layouts ({', '.join(sorted(layouts))}): "
                         "their cases would replace each other; keep them in separate results")
    differing = [k for k in _SOFTWARE if len({json.dumps(d["meta"].get(k), sort_keys=True) for d in docs}) > 1]
    if differing:
        print(f"anymask bench --merge: the parts differ in {', '.join(differing)}; the merged meta shows the "
              "first part's, and meta.parts lists each part's commit", file=sys.stderr)
    meta = dict(docs[0]["meta"], plot_prefix=plot_prefix(tag))
    meta["grid_options"] = [g for d in docs for g in d["meta"]["grid_options"]]
    meta["parts"] = [part for f, d in zip(files, docs)
                     for part in d["meta"].get("parts") or [{"file": Path(f).name, "date": d["meta"].get("date"),
                                                             "git_commit": d["meta"].get("git_commit"),
                                                             "command": d["meta"].get("command"),
                                                             "seconds": d["summary"].get("seconds")}]]
    def case(row) -> tuple:
        return tuple(row[k] for k in _CASE_FIELDS)

    # a case belongs to the last part that measured it; a part cut short (deadline, timeout) holds one
    # placeholder row (variant "*") per case it never started, which replaces nothing
    owner = {case(r): i for i, d in enumerate(docs) for r in d["rows"] if r["variant"] != "*"}
    owner.update({case(r): i for i, d in enumerate(docs) for r in d["rows"] if case(r) not in owner})
    rows = [r for i, d in enumerate(docs) for r in d["rows"] if owner[case(r)] == i]
    summary = dict(docs[0]["summary"], seconds=round(sum(d["summary"].get("seconds", 0) for d in docs), 1),
                   out=str(out))
    merged = out / f"{tag}.json"
    merged.write_text(json.dumps({"meta": meta, "summary": summary, "cases": [], "rows": rows}))
    return _plot_only(merged, plots=plots)


def _check_tag(tag: str) -> None:
    """``--tag`` names files in ``--out``: a plain name, checked before a long run, not after it."""
    if not tag or tag in (".", "..") or any(sep in tag for sep in ("/", "\\")):
        raise _usage_error("bench", f"--tag {tag!r}: a plain file name stem (no folders; --out DIR chooses the folder)")


def _check_writable(command: str, directory: Path, what: str) -> None:
    """A usage error, before any measuring, where ``directory`` (created if missing) takes no file."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as exc:
        raise _usage_error(command, f"cannot write {what} in {str(directory)!r}: {exc.strerror or exc}") from None


def _made_dir(path: Path) -> Path:
    """``path`` created (parents too) before any work; a file in the way or no permission is a usage error."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _usage_error("bench", f"cannot create --out {str(path)!r}: {exc.strerror or exc}") from None
    return path


_RUN_OPTIONS = ("grid", "quick", "config", "masks", "seqlens", "dtypes", "passes", "head_dims", "heads", "batch",
                "tokens", "device", "threads", "backends", "tune", "budget", "deadline")


def _refuse_run_options(args) -> None:
    """``--merge`` and ``--plot-only`` run nothing: options of a run (and each other) are usage errors,
    not silently ignored."""
    given = [name for name in _RUN_OPTIONS if getattr(args, name, None) not in (None, False)]
    given += [name for name, default in (("layout", "bhsd"), ("sets", 3)) if getattr(args, name) != default]
    if args.merge and args.plot_only:
        given.append("plot_only")
    if given:
        which = "--merge" if args.merge else "--plot-only"
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise _usage_error("bench", f"{which} runs nothing; {flags} would be ignored (only --out, --tag and "
                                    "--no-plot apply)")


def _bench(args) -> int:
    from . import env, report, runner, variants

    _check_tag(args.tag)
    if args.merge or args.plot_only:
        _refuse_run_options(args)
    if args.merge:
        if not args.out:
            raise _usage_error("bench", "--merge needs --out DIR: the folder for the merged result")
        return _merge(args.merge, _made_dir(Path(args.out)), args.tag, plots=not args.no_plot)
    if args.plot_only:
        return _plot_only(Path(args.plot_only), _made_dir(Path(args.out)) if args.out else None,
                          plots=not args.no_plot)
    start = time.perf_counter()
    name, grids, cases, config, device = _resolve(args)
    backends = args.backends or config.get("backends")
    if isinstance(backends, str):
        backends = backends.split(",")
    backends = [b.strip() for b in backends or () if b.strip()]
    if args.tune and backends:
        print("anymask bench: --tune with --backends stores the fastest of the listed backends as auto's choice "
              "for these problems (in the tuning cache, for every later run); without --backends it is the "
              "fastest of all", file=sys.stderr)
    try:
        names = variants.names(backends or None)
    except ValueError as exc:
        raise _usage_error("bench", str(exc)) from None
    settings = SETTINGS[name]
    if args.budget is not None:
        settings = dataclasses.replace(settings, budget_s=args.budget)
    tag = args.tag
    out = Path(args.out) if args.out else _default_out(Path("benchmarks") / "results" / env.device_slug(device))
    _check_writable("bench", _made_dir(out), "results")
    if (out / f"{tag}.json").is_dir() or (out / f"{tag}.csv").is_dir():
        raise _usage_error("bench", f"{out / tag}.json or .csv is a directory; choose another --out or --tag")
    meta = env.metadata(device)
    _, unavailable = variants.available()
    meta.update(grid=name, grid_options=grid_dict(grids), variants=names, unavailable=unavailable,
                plot_prefix=plot_prefix(tag),
                settings=dataclasses.asdict(settings),
                input_sets=args.sets, tune=args.tune, layout=args.layout,
                command="anymask bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]))
    signal.signal(signal.SIGTERM, _interrupt)  # `timeout` stops the run; results so far are written
    print(f"anymask bench: {len(cases)} cases x {len(names)} variants on {meta['device']} "
          f"(torch {meta['torch']}, grid {name}, inputs {args.layout}) -> {out}", file=sys.stderr)
    rows = runner.run(cases, device=device, names=names, settings=settings, tune=args.tune, sets=args.sets,
                      progress=not args.no_progress, deadline_s=args.deadline, forced=bool(backends),
                      layout=args.layout)
    cases_summary = report.case_summaries(rows)
    line = report.summary(rows, cases_summary, str(out), device=meta["device"], grid=name,
                          seconds=round(time.perf_counter() - start, 1))
    print(report.full_table(rows))
    print(report.summary_table(cases_summary))
    earlier = _read_results(out / f"{tag}.json")
    try:
        report.write_csv(rows, out / f"{tag}.csv")
        report.write_json(rows, cases_summary, meta, line, out / f"{tag}.json")
        _remove_stale_plots(out, tag, earlier, [] if args.no_plot else _plot(rows, out, meta))
    except OSError as exc:
        print(f"anymask bench: error: cannot write the results into {out} ({exc.strerror or exc}); "
              "the tables above are all that is left of this run", file=sys.stderr)
        return 1
    print(json.dumps(line))
    return _bench_status(rows, line)


def _bench_status(rows, line: dict) -> int:
    """130 for a run stopped by Ctrl-C or SIGTERM, 1 where a variant failed or nothing was measured
    (each said on stderr), else 0.  A deadline that cut cases short is a normal end."""
    if any(r.variant == "*" and r.reason.endswith("interrupted") for r in rows):
        n = line["not_started"]
        print(f"anymask bench: interrupted; {n} case{'s' * (n != 1)} not started (results so far written)",
              file=sys.stderr)
        return 130
    if line["failed"]:
        print(f"anymask bench: {line['failed']} variant(s) failed (see 'failed' rows above)", file=sys.stderr)
        return 1
    if not any(r.status == "ok" for r in rows):
        print("anymask bench: nothing was measured (every variant skipped; see the reasons above)", file=sys.stderr)
        return 1
    return 0


def _default_out(base: Path) -> Path:
    """``base`` (the device's results directory) if it holds no results and no other live run is
    writing there; else a new ``run-<UTC time>`` directory under it.  A run claims its directory with
    a ``.anymask-bench.running`` file (its PID) made exclusively, so two runs started together do not
    share one."""
    if not (any(_made_dir(base).glob("*.json")) or any(base.glob("*.png"))) and _claim(base):
        return base
    stamp = time.strftime("run-%Y%m%d-%H%M%S", time.gmtime())
    for n in range(1, 1000):
        out = base / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            out.mkdir(parents=True)
        except FileExistsError:
            continue
        except OSError as exc:
            raise _usage_error("bench", f"cannot create {str(out)!r}: {exc.strerror or exc}") from None
        _claim(out)
        print(f"anymask bench: {base} holds results (or another run is writing there); writing to {out} "
              "(--out DIR to choose)", file=sys.stderr)
        return out
    raise _usage_error("bench", f"{base} holds 999 runs started this second; choose --out")


def _claim(directory: Path) -> bool:
    """Make ``directory/.anymask-bench.running`` (this PID), removed when the process ends; False
    where a live process holds it (a dead one's claim is taken over)."""
    import atexit

    path = directory / ".anymask-bench.running"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _holder_alive(path):
                return False
            path.unlink(missing_ok=True)  # a run killed before it could remove its claim
            continue
        except OSError as exc:
            raise _usage_error("bench", f"cannot write results in {str(directory)!r}: {exc.strerror or exc}") from None
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        atexit.register(lambda: path.unlink(missing_ok=True))
        return True
    return False


def _holder_alive(path: Path) -> bool:
    """Whether the process whose PID ``path`` holds is running (an unreadable claim counts as live)."""
    try:
        pid = int(path.read_text())
        os.kill(pid, 0)
    except (ValueError, OSError) as exc:
        return not isinstance(exc, ProcessLookupError)
    return True


def _tune(args) -> int:
    from tqdm import tqdm

    from .. import tuning
    from ..problem import describe
    from .cases import bench_mask
    from .inputs import make_inputs

    _, _, cases, config, device = _resolve(args)
    if "backends" in config:
        raise _usage_error("tune", f"{args.config}: backends is a bench option; tune measures every backend "
                                   "(anymask bench --tune --backends ... stores the fastest of a subset)")
    _check_writable("tune", tuning.cache_path().parent, f"the tuning cache ({tuning.ENV_DIR} chooses where)")
    print(f"anymask tune: {len(cases)} cases -> {tuning.cache_path()}", file=sys.stderr)
    results, interrupted = [], False
    try:
        for case in tqdm(cases, desc="anymask tune", unit="case", file=sys.stderr, disable=args.no_progress):
            mask = bench_mask(case.mask, case.batch, case.seq)
            sets = make_inputs(case.batch, case.heads, case.kv_heads, case.seq, case.seq, case.head_dim,
                               case.torch_dtype, device, sets=1)
            q, k, v = (t.detach().requires_grad_(case.grad) for t in (sets.q[0], sets.k[0], sets.v[0]))
            with torch.set_grad_enabled(case.grad):
                sig = tuning.signature(describe(q, k, v, mask, None))
                cached = not args.force and sig in tuning.entries(device)
                winner = tuning.tune(q, k, v, mask, force=args.force)
            entry = tuning.entries(device).get(sig, {})
            results.append((case.label(), winner, entry.get("ms", {}), entry.get("rejected", {}), cached))
    except KeyboardInterrupt:
        interrupted = True
    for label, winner, ms, rejected, cached in results:
        times = "  ".join(f"{n} {t:.3f}" for n, t in sorted(ms.items(), key=lambda kv: kv[1]))
        print(f"{label:<46} -> {winner or '-':<10} ms: {times}{'  (cached; --force re-measures)' if cached else ''}")
        for n, why in rejected.items():
            print(f"{'':<50}{n}: {why}")
    print(json.dumps({"tune": "anymask", "cases": len(results), "cache": str(tuning.cache_path()),
                      "interrupted": interrupted,
                      "winners": {w: sum(r[1] == w for r in results) for w in {r[1] for r in results}}}))
    if interrupted:
        print(f"anymask tune: interrupted after {len(results)} of {len(cases)} cases (their choices are stored)",
              file=sys.stderr)
        return 130
    return 0


def register(subparsers) -> None:
    """Add ``bench`` and ``tune`` to an argparse ``subparsers`` object."""
    bench = subparsers.add_parser("bench", help="every backend side by side on a grid of cases",
                                  description=BENCH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_grid_options(bench)
    bench.add_argument("--backends", help="comma list of variants: backend names, auto, raw_sdpa_dense, "
                                          "raw_flex, raw_fa4 (default: all available)")
    bench.add_argument("--out", metavar="DIR", help="output directory (default benchmarks/results/<device>/)")
    bench.add_argument("--tag", default="bench", help="file name stem of the CSV/JSON (default bench)")
    bench.add_argument("--layout", choices=("bhsd", "bshd"), default="bhsd",
                       help="memory layout of q, k, v and dO: bhsd contiguous [B, H, S, D] (default); bshd "
                            "[B, S, H, D] viewed as [B, H, S, D], as a Llama layer's projections give them")
    bench.add_argument("--tune", action="store_true",
                       help="store each case's fastest correct backend in the tuning cache before timing auto")
    bench.add_argument("--sets", type=positive_int, default=3, help="input sets rotated between calls (default 3)")
    bench.add_argument("--budget", type=positive_seconds, metavar="S",
                       help="steady-state seconds per variant per case (default: the grid's)")
    bench.add_argument("--deadline", type=positive_seconds, metavar="S",
                       help="start no new problem after S seconds (the rest is reported as skipped)")
    bench.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    bench.add_argument("--plot-only", metavar="PATH", help="no run: plots, CSV and summaries again from earlier "
                                                         "JSON results (a file, or every *.json in a directory), "
                                                         "rewritten in place with today's summaries, or written "
                                                         "into --out DIR")
    bench.add_argument("--merge", nargs="+", metavar="JSON", help="no run: one result (<out>/<tag>.json, CSV, "
                       "plots, summaries) from several JSON results of the same device, e.g. a grid split over GPUs; a case "
                       "in several parts keeps the last part's rows")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.set_defaults(func=_bench)

    tune = subparsers.add_parser("tune", help="measure the grid's problems and cache each one's fastest backend",
                                 description="Time every backend that can run each case of the grid (options as "
                                             "for bench) and store the fastest correct one in the tuning cache, "
                                             "where auto reads it for problems of the same signature.")
    _add_grid_options(tune)
    tune.add_argument("--force", action="store_true", help="re-measure signatures already in the cache")
    tune.add_argument("--no-progress", action="store_true", help="no progress bar")
    tune.set_defaults(func=_tune)
