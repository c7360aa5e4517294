"""``anymask`` command line: demo | info | draw | bench | tune | train."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

from . import masks as M
from ._optional import MissingDependency


def positive_int(text: str) -> int:
    """argparse type: a whole number of 1 or more (a clear usage error otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not 1 or more")
    return value


DRAW_MAX_SEQ = 200  # a picture takes 2 columns a token: wider than a few hundred columns, no terminal shows it


def drawable_seq(text: str) -> int:
    """argparse type: a sequence length ``anymask draw`` can print (1 to ``DRAW_MAX_SEQ``)."""
    value = positive_int(text)
    if value > DRAW_MAX_SEQ:
        raise argparse.ArgumentTypeError(f"{value} is more than {DRAW_MAX_SEQ}: the picture takes 2 columns a "
                                         "token (Mask.to_dense gives a bigger mask as a tensor)")
    return value


def _info(args) -> int:
    from .attention import backends

    import torch

    print(f"anymask {__import__('anymask').__version__}  torch {torch.__version__}  "
          f"device {'cuda: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
    for name, entry in backends().items():
        state = "available" if entry["available"] else "unavailable"
        print(f"  {name:<11} {state:<12} {entry['summary']}")
        for reason in entry["reasons"]:
            print(f"  {'':<11} - {reason}")
    return 0


def _draw(args) -> int:
    if args.mask not in M.CATALOGUE:
        print(f"unknown mask {args.mask!r}; choose from {', '.join(M.CATALOGUE)}", file=sys.stderr)
        return 2
    from .demo import catalogue_picture

    print(catalogue_picture(args.mask, args.seq))
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # each line as it comes, also into a pipe or a log

    return run_demo(seq=args.seq, batch=args.batch, heads=args.heads, head_dim=args.head_dim,
                    model=not args.no_model)


def _optional_commands(sub) -> None:
    """Subcommands whose modules may be absent in a partial install register themselves."""
    for module in ("anymask.bench.cli", "anymask.train.cli"):
        try:
            importlib.import_module(module).register(sub)
        except ModuleNotFoundError as exc:
            if not (exc.name or "").startswith("anymask"):
                raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anymask", description="Exact attention with any mask.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="every mask on every backend, checked and timed; then a model")
    demo.add_argument("--seq", type=positive_int, default=512, help="sequence length (default 512)")
    demo.add_argument("--batch", type=positive_int, default=2, help="batch size (default 2)")
    demo.add_argument("--heads", type=positive_int, default=4, help="attention heads (default 4)")
    demo.add_argument("--head-dim", type=positive_int, default=64, help="head dim (default 64)")
    demo.add_argument("--no-model", action="store_true", help="skip the Hugging Face model part")
    demo.set_defaults(func=_demo)
    info = sub.add_parser("info", help="the backends on this machine, and why not",
                          description="Every anymask backend: available on this machine, or the reasons it is not "
                                      "(a missing package with its install hint, no GPU, ...).")
    info.set_defaults(func=_info)
    draw = sub.add_parser("draw", help="print a catalogue mask as an ASCII grid",
                          description="Print a catalogue mask as an ASCII grid (# may attend, . may not): the second "
                                      "of two batch rows (padding's first row is unpadded, its second 35% real tokens).")
    draw.add_argument("mask", help=", ".join(M.CATALOGUE))
    draw.add_argument("--seq", type=drawable_seq, default=12, help=f"tokens, 1 to {DRAW_MAX_SEQ} (default 12)")
    draw.set_defaults(func=_draw)
    _optional_commands(sub)
    return parser


def _stop(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stop) if main_thread else None  # `timeout`, a scheduler: as Ctrl-C
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:  # one line, not a traceback (``train`` and ``bench`` say more)
        print(f"anymask {args.command}: interrupted", file=sys.stderr)
        return 130
    except MissingDependency as exc:  # an optional dependency the command needs: its install hint
        print(f"anymask {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
