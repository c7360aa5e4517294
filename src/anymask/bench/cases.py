"""The grid of bench cases: frozen ``Case`` records, the default grids, config files, and masks.

A case is one attention problem: a mask kind from :data:`anymask.masks.CATALOGUE`, a batch of
``seq``-token rows, ``heads`` query heads over ``kv_heads`` key/value heads (GQA when they
differ), a head dim, a dtype and a pass (``fwd`` or ``fwd+bwd``).  Grids expand to cases ordered
so that the passes of one problem are neighbours (they share inputs and the reference).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from .. import masks as M

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}
PASSES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Case:
    mask: str  # a CATALOGUE name
    batch: int
    seq: int  # q_len == kv_len
    heads: int  # query heads
    kv_heads: int
    head_dim: int
    dtype: str  # "bf16" | "fp16" | "fp32"
    mode: str  # "fwd" | "fwd+bwd"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def grad(self) -> bool:
        return self.mode == "fwd+bwd"

    @property
    def problem_key(self) -> tuple:
        """Everything but the pass: cases with one key share inputs and the reference."""
        return (self.mask, self.batch, self.seq, self.heads, self.kv_heads, self.head_dim, self.dtype)

    def label(self) -> str:
        heads = f"{self.heads}" if self.heads == self.kv_heads else f"{self.heads}:{self.kv_heads}"
        return f"{self.mask} B{self.batch} S{self.seq} H{heads} D{self.head_dim} {self.dtype} {self.mode}"


@dataclass(frozen=True)
class Grid:
    masks: tuple[str, ...] = tuple(M.CATALOGUE)
    seqlens: tuple[int, ...] = (512,)
    dtypes: tuple[str, ...] = ("fp32",)
    passes: tuple[str, ...] = PASSES
    head_dims: tuple[int, ...] = (64,)
    heads: tuple[tuple[int, int], ...] = ((8, 8),)  # (query heads, kv heads)
    tokens: int = 4096  # batch = max(1, tokens // seq) unless batch is set
    batch: int | None = None

    def cases(self) -> list[Case]:
        out = []
        for dtype in self.dtypes:
            for mask in self.masks:
                for seq in self.seqlens:
                    batch = self.batch or max(1, self.tokens // seq)
                    for hq, hkv in self.heads:
                        for d in self.head_dims:
                            out.extend(Case(mask, batch, seq, hq, hkv, d, dtype, mode) for mode in self.passes)
        return out


_GPU = dict(heads=((16, 16),), head_dims=(128,), tokens=16384)

GRIDS: dict[str, tuple[Grid, ...]] = {
    # CI: tiny; four kinds of mask (dense, padded, packed, opaque), GQA, both passes; < 1 min.
    "quick": (Grid(masks=("causal", "padding", "documents_causal", "custom"), seqlens=(128,), heads=((4, 2),),
                   head_dims=(32,), tokens=256),),
    # CPU, 2 cores, a few minutes: 2k tokens per step, 4 heads, both passes at S 256 and 1024; GQA
    # 4:1 at S 1024 fwd+bwd (FlexAttention compiles per shape and mask: ~4 s each on 2 cores).
    "cpu": (Grid(seqlens=(256, 1024), heads=((4, 4),), head_dims=(64,), tokens=2048),
            Grid(seqlens=(1024,), heads=((4, 1),), head_dims=(64,), tokens=2048, passes=("fwd+bwd",))),
    # GPU (issue 5's cases): 16k tokens per step, head dim 128, every mask.  Selective, so that
    # compilation (FlexAttention compiles per shape, mask and pass) and FP32's slow peers fit in
    # ~8 minutes on an H200, and ordered by priority (``--deadline`` cuts the tail): bf16 S 4096
    # both passes; fp32 S 4096 fwd+bwd (fp32 FlexAttention runs ~5 TFLOP/s); bf16 S 16384 both
    # passes; bf16 GQA 32:8 S 4096 fwd+bwd.
    "gpu": (Grid(dtypes=("bf16",), **dict(_GPU, seqlens=(4096,))),
            Grid(dtypes=("fp32",), passes=("fwd+bwd",), **dict(_GPU, seqlens=(4096,))),
            Grid(dtypes=("bf16",), **dict(_GPU, seqlens=(16384,))),
            Grid(dtypes=("bf16",), passes=("fwd+bwd",), **dict(_GPU, seqlens=(4096,), heads=((32, 8),)))),
}


def expand(grids: tuple[Grid, ...]) -> list[Case]:
    """The cases of several grids, in order, without duplicates."""
    return list(dict.fromkeys(c for g in grids for c in g.cases()))


# masks ------------------------------------------------------------------------------------------


def doc_lengths(seq: int, seed: int = 0) -> list[int]:
    """Deterministic document lengths summing to ``seq``: uniform in 256-2048 tokens, scaled down
    for short sequences (``seq / 16`` to ``seq / 2``); the last document is cut to fit."""
    lo = max(1, min(256, seq // 16))
    hi = max(lo, min(2048, seq // 2))
    rng, out = random.Random(seed), []
    while sum(out) < seq:
        out.append(min(seq - sum(out), rng.randint(lo, hi)))
    return out


def bench_mask(kind: str, batch: int, seq: int) -> M.Mask:
    """The catalogue mask ``kind`` with bench-sized parameters.

    documents: 256-2048-token documents, different per batch row; sliding_window: 1024 tokens back
    (``seq / 4`` for shorter sequences), causal; padding: rows 100% down to 35% filled; prefix_lm:
    a quarter of the sequence.  Other kinds (packed_prefix_lm: five documents, 40% prompt each;
    custom) are the catalogue's own.
    """
    if kind not in M.CATALOGUE:
        raise ValueError(f"unknown mask {kind!r}; choose from {', '.join(M.CATALOGUE)}")
    if kind in ("documents", "documents_causal"):
        docs = M.documents(lengths=[doc_lengths(seq, seed=row) for row in range(batch)])
        return docs & M.causal() if kind == "documents_causal" else docs
    if kind == "sliding_window":
        return M.window(max(1, min(1024, seq // 4))) & M.causal()
    return M.CATALOGUE[kind](batch, seq)


# parsing ----------------------------------------------------------------------------------------


def parse_dtype(name: str) -> str:
    name = name.strip().lower()
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return name


def parse_heads(spec: str | int | tuple) -> tuple[int, int]:
    """``"16"`` -> (16, 16); ``"32:8"`` -> (32, 8) (query heads : kv heads)."""
    if isinstance(spec, (tuple, list)):
        if len(spec) != 2:
            raise ValueError(f"heads {spec!r}: one number, or [query, kv]")
        hq, hkv = (_count(x) for x in spec)
    elif isinstance(spec, int):
        hq = hkv = spec
    else:
        parts = str(spec).split(":")
        if len(parts) > 2:
            raise ValueError(f"heads {spec!r}: one number, or query:kv")
        try:
            hq = int(parts[0])
            hkv = int(parts[1]) if len(parts) > 1 else hq
        except ValueError:
            raise ValueError(f"heads {spec!r}: one number, or query:kv (e.g. 16 or 32:8)") from None
    if hq < 1 or hkv < 1 or hq % hkv:
        raise ValueError(f"heads {spec!r}: query heads must be a positive multiple of kv heads")
    return hq, hkv


def parse_pass(name: str) -> str:
    name = name.strip().lower().replace("fwdbwd", "fwd+bwd").replace("fwd_bwd", "fwd+bwd")
    if name in ("bwd", "train"):
        name = "fwd+bwd"
    if name not in PASSES:
        raise ValueError(f"unknown pass {name!r}; choose from {', '.join(PASSES)}")
    return name


def _count(value) -> int:
    """A sequence length, head dim, head count, batch or token count: a whole number of 1 or more."""
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an infinite float from a config file
        raise ValueError(f"{value!r} is not a whole number") from None
    if number < 1 or number != float(value):
        raise ValueError(f"{value!r} is not a whole number of 1 or more")
    return number


def _items(value) -> list:
    if isinstance(value, str):
        return [x for x in (s.strip() for s in value.split(",")) if x]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def override(grid: Grid, **options) -> Grid:
    """``grid`` with the given options (``None`` = keep); values are lists or comma strings."""
    changes = {}
    parsers = {"masks": str, "seqlens": _count, "dtypes": parse_dtype, "passes": parse_pass,
               "head_dims": _count, "heads": parse_heads}
    for name, value in options.items():
        if value is None:
            continue
        if name in parsers:
            try:
                items = tuple(parsers[name](x) for x in _items(value))
            except ValueError as exc:
                raise ValueError(str(exc) if str(exc).startswith(name) else f"{name}: {exc}") from None
            if name == "masks":
                for m in items:
                    if m not in M.CATALOGUE:
                        raise ValueError(f"unknown mask {m!r}; choose from {', '.join(M.CATALOGUE)}")
            if not items:
                raise ValueError(f"{name}: empty list")
            changes[name] = items
        elif name in ("tokens", "batch"):
            try:
                changes[name] = _count(value)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        else:
            raise ValueError(f"unknown grid option {name!r}; known: {', '.join(f.name for f in fields(Grid))}")
    return replace(grid, **changes)


# What each part of a default grid exists to vary, beyond its first part: setting one of these
# options drops that part (the options then say which cases run); other options apply to every part.
PART_VARIES: dict[str, tuple[tuple[str, ...], ...]] = {
    "quick": ((),),
    "cpu": ((), ("heads", "seqlens")),  # GQA 4:1 at S 1024
    "gpu": ((), ("dtypes",), ("seqlens",), ("heads",)),  # fp32; S 16384; GQA 32:8
}


def override_parts(name: str, *layers: dict) -> tuple[Grid, ...]:
    """Default grid ``name``'s parts with the options of ``layers`` (a config file's, then the
    command line's; ``None`` = keep; a later layer's value replaces an earlier one's).  A part is
    dropped when an option it exists to vary (``PART_VARIES``) is set: ``--seqlens 64`` on the cpu
    grid gives S 64 only, not a GQA case at S 64 too; ``--passes fwd+bwd`` keeps it."""
    given = {option: value for options in layers for option, value in options.items() if value is not None}
    kept = (g for g, varies in zip(GRIDS[name], PART_VARIES[name], strict=True) if not given.keys() & set(varies))
    return tuple(override(g, **given) for g in kept)  # the last layer's value only: an overridden one is not read


def load_config(path: str | Path) -> dict:
    """Options from a JSON or TOML file: ``{"grid": "gpu", "masks": [...], "seqlens": [...],
    "dtypes": [...], "passes": [...], "head_dims": [...], "heads": ["16", "32:8"], "batch": N,
    "tokens": N, "backends": [...]}`` (every key optional)."""
    path = Path(path)
    try:
        data = _parse_config(path, path.read_text())
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file (a config file is JSON or TOML)") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table/object of options")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    for key, value in data.items():
        _check_type(path, key, value)
    return data


_NAMES = ("grid", "backends", "masks", "dtypes", "passes")  # options whose values are names
_SINGLE = ("grid", "batch", "tokens")  # one value, not a list


def _check_type(path: Path, key: str, value) -> None:
    """A config value of the wrong type (a number where a name goes, a list for ``grid``) is a
    ``ValueError`` naming the file and option."""
    if key in _SINGLE and isinstance(value, list):
        raise ValueError(f"{path}: {key} takes one value, got a list")
    for item in value if isinstance(value, list) else [value]:
        if key in _NAMES:
            ok = isinstance(item, str)
        elif key == "heads":
            ok = (isinstance(item, (str, int)) and not isinstance(item, bool)) or (isinstance(item, list) and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in item))
        else:
            ok = isinstance(item, (str, int, float)) and not isinstance(item, bool)
        if not ok:
            what = "names (strings)" if key in _NAMES else "numbers"
            raise ValueError(f"{path}: {key} takes {what}, got {item!r}")


def _parse_config(path: Path, text: str):
    """The JSON or TOML document in ``text``; a syntax error names the file, line and column."""
    if path.suffix.lower() != ".toml":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise ValueError(f"{path}: TOML configs need Python 3.11+ (tomllib); write it as JSON") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: invalid TOML: {exc}") from None


def grid_dict(grids: tuple[Grid, ...]) -> list[dict]:
    out = []
    for grid in dict.fromkeys(grids):  # overriding every option can make a grid's parts equal
        d = asdict(grid)
        d["heads"] = [f"{a}:{b}" if a != b else str(a) for a, b in grid.heads]
        out.append(d)
    return out


__all__ = ["Case", "Grid", "GRIDS", "expand", "DTYPES", "PASSES", "bench_mask", "doc_lengths", "override",
           "override_parts", "load_config", "parse_heads", "grid_dict"]
