"""The ``st2he`` command line: every step of the pipeline over SpatialData zarr stores, for batch jobs.

``st2he read`` turns an instrument output folder into a zarr store; each later step (``st2he rasterize
store.zarr``, ``virtual-he``, ``zero-shot``, ``evaluate``) opens the store with :func:`spatialdata.read_zarr`,
runs its st2he function with the options given, and writes back only the elements the function added or
replaced, each with :func:`st2he.io.write_element` (all or nothing): every other element stays on disk as it was.
The options are the function's keyword arguments (``pixel_size`` -> ``--pixel-size``, ``None`` spelt ``none``),
their help the first sentence of its docstring.

Adding a step over a store is one small function registered with :func:`step`; the elements it writes are found
by comparing the object before and after::

    @step("register", "st2he.tl.register_he")
    def _register(sdata, function, options):
        \"\"\"Bring the H&E image onto the nuclear stain.\"\"\"
        function(sdata, **options)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import logging
import os
import re
import shutil
import sys
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("st2he")

PROG = "st2he"
#: Exit status of a run that failed for a reason the message explains (bad option, missing store or element).
EXIT_USAGE = 2
_FN = "fn."  # prefix of the argparse destinations that are the function's keyword arguments
#: Packages of the "models" extra: a missing one is reported as such, not as a traceback.
_MODEL_PACKAGES = {"torch", "diffusers", "transformers", "peft", "safetensors", "open_clip", "timm", "huggingface_hub"}


class CliError(Exception):
    """A problem with the command line's input that its message explains (exit status 2, no traceback)."""


@dataclass(frozen=True)
class Command:
    """A subcommand: ``add_arguments(parser)`` declares its options, ``execute(args)`` runs it (exit status)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    execute: Callable[[argparse.Namespace], int]


#: The subcommands, in the order ``st2he --help`` lists them.
COMMANDS: dict[str, Command] = {}


# ---------------------------------------------------------------------------------------------------------------
# options from a function's keyword arguments


def _resolve(path: str) -> Callable:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _parameter_docs(function) -> dict[str, str]:
    """Parameter name -> description, from the ``Parameters`` section of a numpydoc docstring.

    Names documented together (``steps, batch_size``) share one description; they map to ``""`` (no simple help).
    """
    lines = (inspect.getdoc(function) or "").splitlines()

    def is_header(i: int) -> bool:
        return i + 1 < len(lines) and bool(lines[i].strip()) and set(lines[i + 1].strip()) == {"-"}

    start = next((i for i in range(len(lines)) if lines[i].strip() == "Parameters" and is_header(i)), None)
    if start is None:
        return {}
    out: dict[str, str] = {}
    names: list[str] = []
    text: list[str] = []

    def flush() -> None:
        for name in names:
            out[name] = " ".join(text).strip() if len(names) == 1 else ""

    for i in range(start + 2, len(lines)):
        line = lines[i]
        if is_header(i) and not line.startswith(" "):
            break
        if line and not line.startswith(" "):
            flush()
            names = [n.strip() for n in line.split(":")[0].split(",")]
            text = []
        else:
            text.append(line.strip())
    flush()
    return out


def _short(text: str) -> str:
    """A short help from a numpydoc description: its first sentence, without reST markup or long asides."""
    text = re.sub(
        r":\w+:`~?([^`]*?)`", lambda m: m.group(1).rsplit(".", 1)[-1] if "~" in m.group(0) else m.group(1), text
    )
    text = text.replace("``", "")
    first = re.split(r"(?<=[.!?])\s+(?=[A-Z\"])", text, maxsplit=1)[0]
    first = first[:-1] if first.endswith(".") and not first.endswith("...") else first
    first = re.sub(r"\s*\([^()]{30,}\)", "", first)  # long asides in brackets
    if len(first) > 110 and "; " in first:
        first = first.split("; ")[0]
    return re.sub(r"\bNone\b", "none", first)


def _default_text(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple | list):
        return " ".join(str(v) for v in value)
    return str(value)


def _alternatives(annotation) -> list[str]:
    """Top-level alternatives of an annotation (``"float | Sequence[float] | None"`` -> three strings)."""
    if annotation is inspect.Parameter.empty:
        return []
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "|" and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    parts.append(current.strip())
    return [p for p in parts if p]


_SEQUENCE = re.compile(r"^(?:Sequence|list|Collection|Iterable|tuple)\[(.*)\]$")


@dataclass(frozen=True)
class _Type:
    """How the words of one option become the keyword argument's value."""

    scalars: frozenset[str]  # "int", "float", "str", "none", "json" (a .json file read as a mapping)
    literals: tuple[str, ...] = ()
    nargs: int | str | None = None
    single: frozenset[str] = frozenset()  # nargs "+": a one-word list of these kinds is given as the word itself
    flag: bool = False

    def convert(self, word: str):
        if "none" in self.scalars and word.lower() == "none":
            return None
        if word in self.literals:
            return word
        for name, cast in (("int", int), ("float", float)):
            if name in self.scalars:
                with contextlib.suppress(ValueError):
                    return cast(word)
        if "json" in self.scalars and word.endswith(".json") and Path(word).is_file():
            return json.loads(Path(word).read_text())
        if "str" in self.scalars:
            return word
        wanted = sorted(self.scalars - {"json"}) + [repr(v) for v in self.literals]
        msg = f"expected {' or '.join(wanted)}, got {word!r}"
        raise argparse.ArgumentTypeError(msg)

    def collect(self, values):
        """The value of the converted words: a list, a tuple (fixed count), or one value (``none``, a literal, ...)."""
        if isinstance(self.nargs, int):
            return tuple(values)
        if self.nargs != "+":
            return values
        if len(values) == 1:
            (value,) = values
            if value is None or value in self.literals or type(value).__name__ in self.single:
                return value
        return list(values)


def _scalar_kind(alt: str) -> set[str]:
    if alt in ("int", "float", "bool"):
        return {alt}
    if alt == "None":
        return {"none"}
    if alt.startswith(("Mapping", "dict")):
        return {"json", "str"}
    return {"str"}  # str, Path, os.PathLike, Any


def _infer_type(parameter: inspect.Parameter) -> _Type:
    """The words an option takes, from its argument's annotation (or default): flag, one word, a count, or several."""
    alts = _alternatives(parameter.annotation)
    if not alts:  # no annotation: a flag, a number, or words
        default = parameter.default
        if isinstance(default, bool):
            return _Type(frozenset({"bool"}), flag=True)
        if isinstance(default, int | float):
            return _Type(frozenset({type(default).__name__, "none"}))
        return _Type(frozenset({"str", "none"}), nargs="+", single=frozenset({"str"}))
    if set(alts) <= {"bool", "None"}:
        return _Type(frozenset({"bool"}), flag=True)
    scalars: set[str] = set()
    single: set[str] = set()  # kinds of the alternatives that are one value
    literals: list[str] = []
    nargs: int | str | None = None
    for alt in alts:
        literal = re.match(r"^Literal\[(.*)\]$", alt)
        sequence = _SEQUENCE.match(alt)
        if literal:
            literals += [v.strip().strip("'\"") for v in literal.group(1).split(",")]
        elif sequence:
            members = [m.strip() for m in sequence.group(1).split(",")]
            if alt.startswith("tuple") and len(members) > 1 and "..." not in members:
                nargs = len(members)
                kinds = members
            else:
                nargs = "+"
                kinds = _alternatives(members[0])
            for kind in kinds:
                scalars |= _scalar_kind(kind)
        elif alt in ("Sequence", "list"):
            nargs = "+"
            scalars.add("str")
        else:
            kind = _scalar_kind(alt) - {"bool"}
            scalars |= kind
            single |= kind - {"none", "json"}
    if "None" in alts:
        scalars.add("none")
    return _Type(frozenset(scalars), tuple(literals), nargs, frozenset(single))


class _StoreOption(argparse.Action):
    """Stores the converted words of an option as the keyword argument's value (see :meth:`_Type.collect`)."""

    def __init__(self, *args, kind: _Type, **kwargs):
        self.kind = kind
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.kind.collect(values))


def add_function_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    function: Callable,
    *,
    skip: tuple[str, ...] = (),
    prefix: str = "",
    group: str = "",
    aliases: dict[str, tuple[str, ...]] | None = None,
    helps: dict[str, str] | None = None,
    types: dict[str, Callable[[list[str]], Any]] | None = None,
) -> list[str]:
    """Add one option per keyword argument of ``function``; returns the arguments' names.

    An option is stored only when it is given (the function's own default applies otherwise); read the given ones
    with :func:`function_options` (``group`` keeps apart the options of two functions that share names, ``prefix``
    goes before their flags). ``types`` maps a name to a converter of its words (``nargs="+"``) that replaces the
    inferred one.
    """
    aliases = aliases or {}
    helps = helps or {}
    types = types or {}
    docs = _parameter_docs(function)
    names = []
    for name, parameter in inspect.signature(function).parameters.items():
        if parameter.kind is not inspect.Parameter.KEYWORD_ONLY or name in skip:
            continue
        names.append(name)
        flags = [f"--{prefix}{name.replace('_', '-')}", *aliases.get(name, ())]
        text = helps.get(name, _short(docs.get(name, "")))
        required = parameter.default is inspect.Parameter.empty
        if not required and "default" not in text.lower() and "(required)" not in text:
            default = _default_text(parameter.default)
            text = f"{text} (default: {default})" if text else f"default: {default}"
        text = text.replace("%", "%%")
        dest = f"{_FN}{group}.{name}" if group else f"{_FN}{name}"
        common = {"dest": dest, "help": text, "default": argparse.SUPPRESS, "required": required}
        if name in types:
            convert = types[name]
            parser.add_argument(*flags, nargs="+", metavar=name.upper(), type=str, **common)
            parser.set_defaults(**{f"convert.{dest}": convert})
            continue
        kind = _infer_type(parameter)
        if kind.flag:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **common)
            continue
        metavar = name.upper() if not isinstance(kind.nargs, int) else tuple([name.upper()] * kind.nargs)
        parser.add_argument(
            *flags,
            action=_StoreOption,
            nargs=kind.nargs,
            type=kind.convert,
            kind=kind,
            metavar=metavar,
            **common,
        )
    return names


def function_options(args: argparse.Namespace, group: str = "") -> dict[str, Any]:
    """The keyword arguments given on the command line (converted by ``types`` converters where set)."""
    start = f"{_FN}{group}." if group else _FN
    given = {}
    for dest, value in vars(args).items():
        name = dest[len(start) :]
        if dest.startswith(start) and "." not in name:
            convert = getattr(args, f"convert.{dest}", None)
            given[name] = convert(value) if convert is not None else value
    return given


# ---------------------------------------------------------------------------------------------------------------
# running a step over a store


def open_store(path: str | os.PathLike):
    """Read a SpatialData zarr store, or fail with a message that says what is wrong with the path."""
    import spatialdata

    path = Path(path)
    if not path.exists():
        msg = f"No SpatialData store at {str(path)!r}. Make one with `st2he read <folder> {path}`."
        raise FileNotFoundError(msg)
    if not path.is_dir() or not ({".zgroup", "zarr.json", ".zattrs"} & {p.name for p in path.iterdir()}):
        msg = (
            f"{str(path)!r} is not a zarr store (no .zgroup or zarr.json in it). Give the path of a SpatialData store."
        )
        raise FileNotFoundError(msg)
    with _quiet_io():
        return spatialdata.read_zarr(path)


def check_device(device: str | None) -> None:
    """Fail with a clear message when a CUDA device is asked for and this machine has none."""
    if not isinstance(device, str) or not device.startswith("cuda"):
        return
    try:
        import torch
    except ImportError:
        msg = f"--device {device} needs PyTorch (pip install 'st2he[models]')."
        raise CliError(msg) from None
    if not torch.cuda.is_available():
        msg = (
            f"--device {device}: no CUDA GPU is available on this machine (torch.cuda.is_available() is False). "
            "Run on a GPU node, or pass --device cpu (or auto: the GPU when there is one, else the CPU)."
        )
        raise CliError(msg)
    index = device.partition(":")[2]
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        msg = f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0."
        raise CliError(msg)


def _elements(sdata) -> dict[str, Any]:
    from st2he._elements import ELEMENT_TYPES

    return {key: element for kind in ELEMENT_TYPES for key, element in getattr(sdata, kind).items()}


@contextlib.contextmanager
def _quiet_io() -> Iterator[None]:
    from st2he.io._common import quiet_zarr_writes

    with quiet_zarr_writes(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(zarr|Zarr|consolidated).*")
        # write_element stages a table without the element it annotates: spatialdata warns, needlessly
        warnings.filterwarnings("ignore", message="The table is annotating")
        yield


def write_back(sdata, keys: list[str], *, overwrite: bool, progress: bool) -> None:
    """Write elements ``keys`` of a backed object into its store (tables last), then the object's attributes.

    Each element is written all or nothing by :func:`st2he.io.write_element`; a lazy element is computed while it
    is written (with a progress bar). The parameters st2he records for each element (in ``sdata.attrs``) are
    written into the store's attributes after it.
    """
    from st2he._elements import element_type
    from st2he.io import write_element

    for key in sorted(keys, key=lambda k: element_type(sdata, k) == "tables"):
        logger.info("writing %s %r to %s", element_type(sdata, key), key, sdata.path)
        with _progress(progress), _quiet_io():
            write_element(sdata, key, overwrite=overwrite)
            _write_params(sdata, key)


def _write_params(sdata, key: str) -> None:
    """Write the parameters recorded for element ``key`` into the store's attributes, keeping those on disk.

    The attributes on disk are read again first, so that a job that wrote other elements into the same store since
    this one opened it keeps its records.
    """
    import zarr

    from st2he._elements import ATTRS_KEY

    on_disk = dict(zarr.open_group(store=str(sdata.path), mode="r").attrs.asdict())
    on_disk.pop("spatialdata_attrs", None)
    records = dict(on_disk.get(ATTRS_KEY, {}))
    mine = sdata.attrs.get(ATTRS_KEY, {})
    if key in mine:
        records[key] = mine[key]
    for name, value in on_disk.items():
        sdata.attrs.setdefault(name, value)
    sdata.attrs[ATTRS_KEY] = {**mine, **records}
    sdata.write_attrs()


@contextlib.contextmanager
def _progress(show: bool) -> Iterator[None]:
    if not show:
        yield
        return
    from dask.diagnostics import ProgressBar

    with ProgressBar(minimum=2.0, out=sys.stderr):
        yield


def step(name: str, function: str, *, skip: tuple[str, ...] = (), extra: tuple = (), **option_kwargs):
    """Register ``run(sdata, function, options)`` as the subcommand ``st2he <name> <store> [options]``.

    ``function`` is the dotted path of the st2he function whose keyword arguments become the options (all but
    ``skip``; ``progress`` follows ``--quiet``; ``option_kwargs`` go to :func:`add_function_options`). ``extra``:
    ``(flags, argparse keywords)`` pairs of the step's own options, given to ``run`` in ``options`` under their
    ``dest`` (``run`` takes them out before it calls the function). ``run`` calls the function; it may return the
    names of elements it changed in place (a table that gained columns), which are written back too. Every element
    that is new or replaced after ``run`` is written into the store; nothing else is touched.
    """

    def register(run: Callable) -> Callable:
        def add_arguments(parser: argparse.ArgumentParser) -> None:
            parser.add_argument("store", type=Path, help="SpatialData zarr store to read and write into")
            fn = _resolve(function)
            names = add_function_options(parser, fn, skip=(*skip, "progress"), **option_kwargs)
            for flags, kwargs in extra:
                parser.add_argument(*flags, **{**kwargs, "dest": _FN + kwargs["dest"], "default": argparse.SUPPRESS})
            parser.set_defaults(takes_progress="progress" in inspect.signature(fn).parameters, option_names=names)

        def execute(args: argparse.Namespace) -> int:
            options = function_options(args)
            check_device(options.get("device"))
            if args.takes_progress:
                options["progress"] = not args.quiet
            sdata = open_store(args.store)
            before = _elements(sdata)
            in_place = run(sdata, _resolve(function), options) or []
            after = _elements(sdata)
            new = [k for k, e in after.items() if k not in before or before[k] is not e]
            gone = sorted(set(before) - set(after))
            if gone:
                logger.info("%s removed %s from the object in memory; the store keeps them", name, gone)
            changed = [k for k in in_place if k not in new and k in after]
            write_back(sdata, new, overwrite=bool(options.get("overwrite")), progress=not args.quiet)
            # elements that the function changes in place by design (a cell table that gained columns)
            write_back(sdata, changed, overwrite=True, progress=not args.quiet)
            logger.info("%s: wrote %s into %s", name, ", ".join(new + changed) or "nothing", args.store)
            return 0

        doc = inspect.getdoc(run) or name
        COMMANDS[name] = Command(name, doc.splitlines()[0], add_arguments, execute)
        return run

    return register


# ---------------------------------------------------------------------------------------------------------------
# the steps over a store


def _palette(words: list[str]):
    """``--palette coexpression``, a JSON file of gene -> colour, or a generator folder (the palette it learnt).

    A generator trained with the panel-independent lineage palette (``metadata["palette_method"] == "lineage"``)
    gives ``"lineage"``: the lineage palette of the sample's own panel, not its training panel's colour map.
    """
    if len(words) != 1:
        msg = f"--palette takes one value, got {words}."
        raise CliError(msg)
    word = words[0]
    path = Path(word)
    if path.is_file() and path.suffix == ".json":
        return json.loads(path.read_text())
    if path.is_dir():
        config = path / "config.json"
        metadata = json.loads(config.read_text()).get("metadata", {}) if config.is_file() else {}
        if metadata.get("palette_method") == "lineage":
            return "lineage"
        palette = metadata.get("palette")
        if not palette:
            msg = f"--palette {word}: a folder must be a generator checkpoint whose config.json records its palette."
            raise CliError(msg)
        return palette
    return word


@step(
    "rasterize",
    "st2he.pp.rasterize_transcripts",
    types={"palette": _palette},
    helps={
        "style": "multicolor (each gene in its palette colour), single (every transcript in --color) or stain (the "
        "stain alone) (default: multicolor)",
        "palette": "coexpression, hue, lineage, a JSON file of gene -> colour, or a generator folder: the palette "
        "it was trained with (lineage for a generator trained with it) (default: coexpression)",
    },
)
def _rasterize(sdata, function, options):
    """Draw the ST2HE input picture (nuclear stain in grey, transcripts as coloured dots) into the store."""
    function(sdata, **options)


@step(
    "virtual-he",
    "st2he.tl.virtual_he",
    helps={
        "method": "diffusion (the pix2pix-turbo generator) or stain (the Beer-Lambert baseline) (default: diffusion)",
        "model": "Generator checkpoint folder, or a shipped generator: small (the default) or small-real",
        "lazy": "Run the model while the image is written into the store, once per pyramid level (default: no)",
    },
)
def _virtual_he(sdata, function, options):
    """Generate a virtual H&E image from the input picture (the generator, or the stain baseline)."""
    function(sdata, **options)


def _classes(words: list[str]):
    """``--prompts nsclc``, ``--prompts prompts.json``, ``--prompts LUAD="adenocarcinoma|lung adenocarcinoma" ...``."""
    if len(words) == 1 and words[0].endswith(".json") and Path(words[0]).is_file():
        return json.loads(Path(words[0]).read_text())
    if len(words) == 1 and "=" not in words[0]:
        return words[0]
    if all("=" in w for w in words):
        return {cls: names.split("|") for cls, _, names in (w.partition("=") for w in words)}
    if any("=" in w for w in words):
        msg = f"--prompts: give every class as CLASS=name1|name2, or only names (one class each); got {words}."
        raise CliError(msg)
    return list(words)


def _clip_model(words: list[str]):
    """``--model hf-hub:...`` / a folder, or ``--model ARCHITECTURE CHECKPOINT``."""
    if len(words) > 2:
        msg = f"--model takes a hub id or folder, or an architecture and a checkpoint file; got {words}."
        raise CliError(msg)
    return words[0] if len(words) == 1 else tuple(words)


@step(
    "zero-shot",
    "st2he.tl.zero_shot",
    aliases={"classes": ("--prompts",)},
    types={"classes": _classes, "model": _clip_model},
    helps={
        "classes": "Classes: a built-in prompt set (nsclc, kaposi, breast, crc), a JSON file of class -> names, "
        "CLASS=name1|name2 ..., or names (one class each)",
        "model": "CLIP model: a hub id, a local folder, or an architecture and a checkpoint file",
    },
)
def _zero_shot(sdata, function, options):
    """Classify the tiles of an H&E image zero-shot with a pathology CLIP model; the slide-level call is printed."""
    table = function(sdata, **options)
    key = options.get("key_added", "zero_shot")
    slide = table.uns[key]["slide"]
    print(f"slide-level call: {slide['class']} ({slide['n_tiles']} tiles)")
    for cls, p in slide["probabilities"].items():
        print(f"  {cls}: {p:.3f}")
    cells = table.uns[key]["params"].get("cells_table")
    return [cells] if cells else []  # its new columns


@step(
    "evaluate",
    "st2he.tl.evaluate_he",
    aliases={"pred_key": ("--virtual-key",), "true_key": ("--real-key",)},
    extra=((("--json",), {"dest": "json", "metavar": "PATH", "help": "also write the metrics to this JSON file"}),),
)
def _evaluate(sdata, function, options):
    """Score a virtual H&E against the real H&E (PSNR, SSIM, MSE); the metrics are printed as a table."""
    json_path = options.pop("json", None)
    frame = function(sdata, **options)
    summary = frame.loc[["overall", "mean_over_tiles"], ["psnr", "ssim", "mse"]].T
    summary.columns.name, summary.index.name = None, "metric"
    print(summary.to_string(float_format=lambda v: f"{v:.4f}"))
    n_tiles = len(frame) - 2
    print(f"({n_tiles} tiles)")
    if json_path is not None:
        report = {
            "pred_key": options.get("pred_key", "virtual_he"),
            "true_key": options.get("true_key", "he_image"),
            "n_tiles": n_tiles,
            **{
                row: {m: float(frame.loc[row, m]) for m in ("psnr", "ssim", "mse")}
                for row in ("overall", "mean_over_tiles")
            },
        }
        Path(json_path).write_text(json.dumps(report, indent=2))
        logger.info("metrics written to %s", json_path)


@step(
    "register",
    "st2he.tl.register_he",
    helps={"transform": "rigid, affine or elastic (affine plus a smooth displacement field) (default: affine)"},
)
def _register(sdata, function, options):
    """Register the H&E onto the nuclear stain; its new transformation is written into the store."""
    report = function(sdata, **options)
    he_key = options.get("he_key", "he_image")
    sdata.write_transformations(he_key)  # only the transformation: the H&E's pixels are not rewritten
    _write_params(sdata, he_key)
    print(report.drop(labels=["matrix"]).to_string())


@step("aggregate", "st2he.pp.aggregate_transcripts")
def _aggregate(sdata, function, options):
    """Count the molecules in cells, pseudo-spots or bins: a table of units (and their shapes) in the store."""
    function(sdata, **options)


@step(
    "super-resolve",
    "st2he.tl.super_resolve",
    helps={"model": "An expression model's folder (method regression)"},
)
def _super_resolve(sdata, function, options):
    """Spread spot-level counts onto bins of a few µm, guided by an image: a table of bins (and their shapes)."""
    function(sdata, **options)


@step(
    "predict-expression",
    "st2he.tl.predict_expression",
    helps={
        "model": "Folder of an expression model saved by train-expression (default: the shipped model)",
        "pooling": "How the model's pixels are pooled into a unit: log (the mean of their log1p CP10k), counts "
        "(log1p of their tissue-weighted mean counts per 10k) or auto (counts for units of 1000 µm² or more, such "
        "as 55 µm spots; else log) (default: auto)",
    },
)
def _predict_expression(sdata, function, options):
    """Predict gene expression and tumour probability per cell, spot or bin from an H&E (real or virtual)."""
    function(sdata, **options)


@step(
    "evaluate-expression",
    "st2he.tl.evaluate_expression",
    extra=((("--json",), {"dest": "json", "metavar": "PATH", "help": "also write the per-gene metrics to this JSON"}),),
)
def _evaluate_expression(sdata, function, options):
    """Score predicted against measured expression gene by gene; the summary is printed."""
    json_path = options.pop("json", None)
    frame = function(sdata, **options)
    summary = frame.attrs.get("summary", {})
    for key, value in summary.items():
        if isinstance(value, int | float):
            print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    if json_path:
        Path(json_path).write_text(frame.to_json(orient="index", indent=2))
        logger.info("metrics written to %s", json_path)


@step(
    "cycle-check",
    "st2he.tl.cycle_check",
    helps={"model": "Folder of an expression model saved by train-expression (default: the shipped model)"},
)
def _cycle_check(sdata, function, options):
    """Read expression back from a virtual H&E (and the real one) and print how much of it the virtual H&E keeps."""
    frame = function(sdata, **options)
    print(frame.to_string(float_format=lambda v: f"{v:.3f}"))


def _train_expression_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stores", type=Path, nargs="+", help="SpatialData zarr stores with an H&E and a counts table")
    names = add_function_options(
        parser,
        _resolve("st2he.tl.train_expression"),
        skip=("progress",),
        helps={
            "output_dir": "Folder of the checkpoints; the trained model is saved in OUTPUT_DIR/model (required)",
            "pooling": "How the loss pools the model's pixels into a unit: log (the mean of their log1p CP10k), "
            "counts (log1p of their tissue-weighted mean counts per 10k) or auto (counts for sections of units of "
            "1000 µm² or more; else log) (default: log)",
        },
    )
    parser.set_defaults(option_names=names)


def _train_expression(args: argparse.Namespace) -> int:
    import st2he

    options = function_options(args)
    if options.get("output_dir") is None:
        msg = "--output-dir is required: the trained expression model is saved there."
        raise CliError(msg)
    check_device(options.get("device"))
    sdatas = [open_store(s) for s in args.stores]
    st2he.tl.train_expression(sdatas if len(sdatas) > 1 else sdatas[0], progress=not args.quiet, **options)
    print(f"model: {Path(options['output_dir']) / 'model'}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# commands that do not work on one store: read, train, demo


_READERS = {"xenium": "st2he.io.read_xenium", "cosmx": "st2he.io.read_cosmx", "merscope": "st2he.io.read_merscope"}
_HE_PREFIX = "he-"  # the options of st2he.io.read_he_image: --he-pixel-size, --he-key, ...


def _read_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", type=Path, help="Xenium, CosMx or MERSCOPE output folder")
    parser.add_argument("store", type=Path, help="SpatialData zarr store to write (a new one)")
    parser.add_argument("--platform", default="auto", choices=["auto", *_READERS], help="platform (default: auto)")
    parser.add_argument("--he-image", type=Path, default=None, help="H&E image to add (SVS, OME-TIFF, PNG, JPEG)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store")
    owners: dict[str, list[str]] = {}
    for platform, path in _READERS.items():
        for name, parameter in inspect.signature(_resolve(path)).parameters.items():
            if parameter.kind is inspect.Parameter.KEYWORD_ONLY:
                owners.setdefault(name, []).append(platform)
    parser.set_defaults(reader_options=owners)
    # a reader's own H&E options (read_xenium's he_pixel_size, he_key) are the --he-* options of the H&E group
    seen: set[str] = {"he_image", "overwrite", "he_pixel_size", "he_key"}
    for platform, path in _READERS.items():
        group = parser.add_argument_group(f"{platform} options")
        skip = tuple(seen)
        names = add_function_options(group, _resolve(path), skip=skip)
        seen |= set(names)
    group = parser.add_argument_group("H&E options (st2he.io.read_he_image)")
    add_function_options(
        group, _resolve("st2he.io.read_he_image"), skip=("sdata", "overwrite"), prefix=_HE_PREFIX, group="he"
    )
    parser.set_defaults(option_names=sorted(seen - {"he_image", "overwrite", "he_pixel_size", "he_key"}))


def _read(args: argparse.Namespace) -> int:
    import st2he
    from st2he._demo import detect_platform

    given = function_options(args)
    he_options = function_options(args, "he")
    folder: Path = args.folder
    if not folder.exists():
        msg = f"No such folder: {str(folder)!r}. Give the output folder of a Xenium, CosMx or MERSCOPE run."
        raise FileNotFoundError(msg)
    platform = detect_platform(folder) if args.platform == "auto" else args.platform
    foreign = sorted(k for k in given if platform not in args.reader_options.get(k, []))
    if foreign:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in foreign)
        msg = f"{flags}: not an option of the {platform} reader ({_READERS[platform]}); see st2he read --help."
        raise CliError(msg)
    store: Path = args.store
    if store.exists() and not args.overwrite:
        msg = f"{str(store)!r} already exists. Pass --overwrite to replace it, or give another store."
        raise CliError(msg)
    if args.he_image is not None and not args.he_image.is_file():
        msg = f"--he-image: no such file: {str(args.he_image)!r}."
        raise FileNotFoundError(msg)
    reader = _resolve(_READERS[platform])
    logger.info("reading %s folder %s", platform, folder)
    if args.he_image is not None and given.get("alignment") is not None:
        # the reader places the H&E itself, by the alignment file (read_xenium)
        unsupported = sorted(set(he_options) - {"pixel_size", "key"})
        if unsupported:
            flags = ", ".join(f"--he-{k.replace('_', '-')}" for k in unsupported)
            msg = f"{flags}: not used when --alignment places the H&E; leave them out."
            raise CliError(msg)
        placed = {f"he_{k}": v for k, v in he_options.items()}
        sdata = reader(folder, he_image=args.he_image, **given, **placed)
    else:
        sdata = reader(folder, **given)
        if args.he_image is not None:
            logger.info("reading H&E image %s", args.he_image)
            st2he.io.read_he_image(args.he_image, sdata=sdata, **he_options)
    write_new_store(sdata, store, overwrite=args.overwrite)
    names = {kind: sorted(getattr(sdata, kind)) for kind in ("images", "labels", "points", "shapes", "tables")}
    logger.info("wrote %s: %s", store, "; ".join(f"{k} {v}" for k, v in names.items() if v))
    files = sdata.attrs.get("st2he", {}).get("files")
    if files is not None:  # which files of the folder the reader used, and which it ignored
        from st2he.io._common import describe_files

        print(describe_files(files))
    return 0


def write_new_store(sdata, store: Path, *, overwrite: bool) -> None:
    """Write a whole object as a new store: into a staging folder beside it, then moved in (the old one removed)."""
    staging = store.parent / f".{store.name}.{uuid.uuid4().hex[:8]}.st2he-partial"
    old = store.parent / f".{store.name}.{uuid.uuid4().hex[:8]}.st2he-replaced"
    try:
        with _quiet_io():
            sdata.write(staging)
        if store.exists():
            if not overwrite:  # pragma: no cover - checked before reading
                msg = f"{str(store)!r} already exists."
                raise CliError(msg)
            os.replace(store, old)
        os.replace(staging, store)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _validation(words: list[str]):
    """``--validation 0.2``, ``--validation none`` or ``--validation held_out.zarr ...`` (stores held out whole)."""
    if len(words) == 1 and words[0].lower() == "none":
        return None
    if len(words) == 1:
        with contextlib.suppress(ValueError):
            return float(words[0])
    return [open_store(w) for w in words]


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stores", type=Path, nargs="+", help="SpatialData zarr stores with input pictures and H&E")
    names = add_function_options(
        parser,
        _resolve("st2he.tl.train_generator"),
        skip=("progress",),
        types={"validation": _validation},
        helps={
            "input_key": "Image element of the input pictures (default: st2he_input)",
            "target_key": "Image element of the aligned real H&E (default: he_image)",
            "model": "small, tiny (trained from scratch), small-real or a checkpoint folder (fine-tuned)",
            "validation": "Held out: a fraction (right-most band of each store), stores held out whole, or none",
            "steps": "AdamW steps",
            "batch_size": "Crops per step",
            "grad_accum": "Gradient accumulation steps",
            "lr": "Learning rate (none: 2e-4 from scratch, 1e-4 for LoRA)",
            "l2_weight": "Weight of the L2 loss",
            "perceptual": "Perceptual loss: auto, lpips, ssim or none",
            "perceptual_weight": "Weight of the perceptual loss",
            "gan_weight": "Weight of the adversarial loss",
            "val_every": "Validate every so many steps",
            "ckpt_every": "Write a checkpoint every so many steps",
            "output_dir": "Folder of the checkpoints and of the final model, OUTPUT_DIR/model (required)",
        },
    )
    parser.set_defaults(option_names=names)


def _train(args: argparse.Namespace) -> int:
    import st2he

    options = function_options(args)
    if options.get("output_dir") is None:
        msg = "--output-dir is required: the trained model is written to OUTPUT_DIR/model."
        raise CliError(msg)
    check_device(options.get("device"))
    sdatas = [open_store(s) for s in args.stores]
    _, history = st2he.tl.train_generator(sdatas if len(sdatas) > 1 else sdatas[0], progress=not args.quiet, **options)
    out = Path(options["output_dir"])
    history.to_csv(out / "history.csv", index=False)
    print(f"model:   {out / 'model'}")
    print(f"history: {out / 'history.csv'}")
    val = history.dropna(subset=["val_psnr"]) if "val_psnr" in history else history.iloc[0:0]
    if len(val):
        last = val.iloc[-1]
        print(f"last validation: PSNR {last['val_psnr']:.2f} dB, SSIM {last['val_ssim']:.4f}")
    return 0


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    from st2he import _demo

    _demo.add_arguments(parser)


def _demo_execute(args: argparse.Namespace) -> int:
    from st2he import _demo

    return _demo.execute(args, prog=f"{PROG} demo")


COMMANDS["read"] = Command(
    "read",
    "Read a Xenium, CosMx or MERSCOPE output folder (and an H&E image) into a new zarr store.",
    _read_arguments,
    _read,
)
# the steps over a store registered above come next in --help, then these
for _name in ("register", "rasterize", "virtual-he", "zero-shot", "evaluate", "aggregate", "super-resolve"):
    COMMANDS[_name] = COMMANDS.pop(_name)
COMMANDS["train"] = Command(
    "train", "Train or fine-tune the generator on stores with input pictures and aligned H&E.", _train_arguments, _train
)
COMMANDS["train-expression"] = Command(
    "train-expression",
    "Train an expression model on stores with an H&E and measured counts (cells, spots or bins).",
    _train_expression_arguments,
    _train_expression,
)
for _name in ("predict-expression", "evaluate-expression", "cycle-check"):
    COMMANDS[_name] = COMMANDS.pop(_name)
COMMANDS["demo"] = Command(
    "demo",
    "Run the whole pipeline on a simulated sample (or --data) and write a store, a figure and metrics.",
    _demo_arguments,
    _demo_execute,
)


# ---------------------------------------------------------------------------------------------------------------
# entry point


def build_parser() -> argparse.ArgumentParser:
    """The ``st2he`` parser with one subparser per command of :data:`COMMANDS`."""
    from st2he import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="st2he: virtual H&E from spatial transcriptomics, step by step over SpatialData zarr stores.",
        epilog="Each step writes only the elements it makes into the store. `st2he <command> --help` lists its options.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for command in COMMANDS.values():
        child = sub.add_parser(command.name, help=command.help, description=command.help)
        child.add_argument("-q", "--quiet", action="store_true", help="no progress bars or messages, only errors")
        command.add_arguments(child)
        child.set_defaults(execute=command.execute)
    return parser


def _message(err: BaseException | Warning | str, args: argparse.Namespace | None) -> str:
    """The message, with the function's keyword arguments spelt as this command line's options."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    text = text.replace("overwrite=True", "--overwrite")
    for name in getattr(args, "option_names", None) or []:
        flag = f"--{name.replace('_', '-')}"
        text = re.sub(rf"(?<![\w.-]){name}=\s?", f"{flag} ", text)  # "key_added='x'" -> "--key-added 'x'"
        if "_" in name:
            text = re.sub(rf"(?<![\w.-]){name}\b", flag, text)
    return text


@contextlib.contextmanager
def _cli_logging(args: argparse.Namespace) -> Iterator[None]:
    """st2he's log messages and warnings on stderr, one line each (nothing but errors with ``--quiet``)."""
    st2he_logger = logging.getLogger("st2he")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    old_level = st2he_logger.level
    st2he_logger.addHandler(handler)
    st2he_logger.setLevel(logging.WARNING if args.quiet else logging.INFO)
    old_show = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if not args.quiet:
            print(f"{PROG}: warning: {_message(message, args)}", file=sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = old_show
        st2he_logger.removeHandler(handler)
        st2he_logger.setLevel(old_level)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``st2he`` command; returns the exit status (2 for an error its message explains)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command = f"{PROG} {args.command}"
    with _cli_logging(args):
        try:
            return args.execute(args)
        except (CliError, FileNotFoundError, FileExistsError, ValueError, KeyError) as err:
            print(f"{command}: error: {_message(err, args)}", file=sys.stderr)
            return EXIT_USAGE
        except ModuleNotFoundError as err:
            if (err.name or "").split(".")[0] not in _MODEL_PACKAGES:
                raise
            print(
                f"{command}: error: {err.name} is not installed; install the models extra: pip install 'st2he[models]'",
                file=sys.stderr,
            )
            return EXIT_USAGE
        except KeyboardInterrupt:
            print(f"{command}: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    raise SystemExit(main())
