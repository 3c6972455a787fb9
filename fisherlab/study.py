"""The fidelity study: the main job of ``fisherlab fidelity``, and the configurations of the command line.

One configuration (:class:`StudyConfig`) runs four parts on one model and data set, each saved as a Dataset in
the output folder as soon as it finishes (a rerun after Ctrl-C resumes from the finished parts):

1. ``fidelity.nc`` — every update rule against exact NGD at the initial parameters, for several dampings
   (:func:`fisherlab.evaluate_fidelity`);
2. ``trajectory.nc`` — the same measurement every few steps along a training run
   (:func:`fisherlab.fidelity_trajectory`), and each of the user's optimizers (``optimizer``) measured along a
   run it trains itself (:func:`with_optimizers`);
3. ``geometry.nc`` — condition numbers of F + λI and of G^{-1/2}(F + λI)G^{-1/2} per structure
   (:func:`fisherlab.fisher_geometry`);
4. ``spectrum.nc`` — spectra of the true, Monte-Carlo and empirical Fishers (:func:`fisherlab.fisher_spectra`).

Then :func:`fisherlab.report.build_report` draws the figures and writes ``report.html`` (``fisherlab fidelity``
draws each part's figures as soon as the part is saved, in a process of its own: ``run_study(saved=...)``).
:class:`SpectraConfig` is the configuration of ``fisherlab spectra``.

Model and data are a built-in name (:data:`MODELS`, :data:`DATA`) or the user's own, named
``module:callable`` or ``path/to/file.py:callable`` (:func:`load_model_and_data` says what the callables must
return). Both configurations validate every field when they are built, so a command line can refuse a bad
option before it claims an output folder. This module imports torch only when a configuration is validated or
run: ``fisherlab --help`` reads the defaults from here.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from fisherlab.checks import check_dampings, check_device, check_lr, check_positive_int
from fisherlab.errors import FisherlabError, InputError
from fisherlab.vocabulary import RECONSTRUCTIBLE, FisherKind

if TYPE_CHECKING:
    import torch
    import xarray as xr

    from fisherlab.data import SplitData
    from fisherlab.fidelity.rules import RuleContext

#: Compute dtypes by name.
DTYPES: tuple[str, ...] = ("float32", "float64")

#: Built-in networks (the names of :data:`fisherlab.models.MODELS`, kept here so that reading a configuration's
#: options needs no torch; a test keeps the two equal).
MODELS: tuple[str, ...] = ("mlp", "cnn", "lstm", "resnet", "gpt", "encoder")

#: Built-in data sets: those of :data:`fisherlab.data.DATASETS` that need no files on disk (a test keeps them in
#: step). ``"text"`` is left out: it reads a file the command line has no option for; load it as your own data,
#: ``file.py:callable`` returning ``fisherlab.data.load_text(path)``.
DATA: tuple[str, ...] = ("digits", "mnist1d", "synthetic-regression", "synthetic-binary", "synthetic-multiclass",
                         "sort", "sort-lm")

#: Built-in models that take token ids, and the built-in data sets of token ids (each model takes only the other's
#: kind; the encoder classifies a sequence, so it takes ``sort`` but not the per-position targets of ``sort-lm``).
TOKEN_MODELS: tuple[str, ...] = ("gpt", "encoder")
TOKEN_DATA: dict[str, tuple[str, ...]] = {"gpt": ("sort", "sort-lm"), "encoder": ("sort",)}

#: Defaults of the options a command line leaves unset, per built-in model where the general ones do not fit
#: (:func:`model_defaults`). A sequence costs far more per sample than a digit: the true Fisher of the GPT on
#: sort-lm has T·(C − 1) = 96 factor rows per sequence, so the study takes 32 sequences and a short trajectory, and
#: trains with KFAC.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt": {"data": "sort-lm", "n_samples": 16, "steps": 4, "every": 2, "train_rule": "kfac", "train_lr": 0.1},
    "encoder": {"data": "sort", "n_samples": 32, "steps": 4, "every": 2, "train_rule": "kfac", "train_lr": 0.1},
}

#: Constructor arguments of the built-in models in a study (:func:`fisherlab.models.build_model`'s defaults
#: otherwise): a GPT of two blocks of width 8 (P = 2,009 on sort-lm), small enough that the dense Fishers, their
#: Cholesky solves and eigendecompositions of the study take seconds.
MODEL_OPTIONS: dict[str, dict[str, Any]] = {
    "gpt": {"d_model": 8, "n_layers": 2, "n_heads": 2},
    "encoder": {"d_model": 8, "n_layers": 1, "n_heads": 2},
}

#: The data layout each built-in model takes on the built-in image / sequence data (None: not supported).
LAYOUTS: dict[tuple[str, str], str | None] = {
    ("mlp", "digits"): "flat", ("cnn", "digits"): "image", ("resnet", "digits"): "image",
    ("mlp", "mnist1d"): "flat", ("cnn", "mnist1d"): "channels", ("resnet", "mnist1d"): "channels",
    ("lstm", "mnist1d"): "sequence", ("lstm", "digits"): None,
}

PARTS = ("fidelity", "trajectory", "geometry", "spectrum")


def option_error(name: str, message: str) -> InputError:
    """An :class:`InputError` about configuration field ``name``; ``.field`` and ``.detail`` let a CLI name it."""
    exc = InputError(f"{name}: {message}")
    exc.field = name  # type: ignore[attr-defined]
    exc.detail = message  # type: ignore[attr-defined]
    return exc


@contextmanager
def _about(name: str) -> Iterator[None]:
    """Re-raise a fisherlab error of a shared check as :func:`option_error` of field ``name``."""
    try:
        yield
    except FisherlabError as exc:
        if getattr(exc, "field", None):
            raise
        raise option_error(name, str(exc)) from None


def is_spec(name: str) -> bool:
    """Whether a model or data name is a user's ``module:callable`` / ``file.py:callable`` (not a built-in)."""
    return ":" in name


def _check_name(name: str, value: Any, builtins: tuple[str, ...]) -> None:
    if not isinstance(value, str) or not value:
        raise option_error(name, f"must be a built-in name or module:callable; got {value!r}")
    if is_spec(value):
        target, _, attr = value.rpartition(":")
        if not target or not all(p.isidentifier() for p in attr.split(".")):
            raise option_error(name, f"{value!r} is not module:callable or path/to/file.py:callable")
    elif value not in builtins:
        raise option_error(name, f"unknown {name} {value!r}; built-in: {', '.join(builtins)}; "
                                 "or your own as module:callable or path/to/file.py:callable")


def _check_tokens(model: str, data: str) -> None:
    """Refuse a built-in model and built-in data of different kinds (token ids or not), naming what fits."""
    if is_spec(model) or is_spec(data):
        return
    tokens = {d for ds in TOKEN_DATA.values() for d in ds}
    if model in TOKEN_MODELS and data not in TOKEN_DATA[model]:
        raise option_error("data", f"model {model!r} takes token data: {', '.join(TOKEN_DATA[model])}; "
                                   f"got {data!r}")
    if model not in TOKEN_MODELS and data in tokens:
        raise option_error("data", f"data {data!r} holds token ids, which model {model!r} does not take; use "
                                   f"model {' or '.join(m for m in TOKEN_MODELS if data in TOKEN_DATA[m])}")


def model_defaults(cls: type[RunConfig], model: str) -> dict[str, Any]:
    """The defaults of ``cls``'s fields that :data:`MODEL_DEFAULTS` changes for built-in ``model`` (else ``{}``)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in MODEL_DEFAULTS.get(model, {}).items() if k in fields}


def _check_names(name: str, values: Any, valid: Any = None, what: str = "") -> list[str]:
    """A non-empty list of distinct strings (each in ``valid`` when given)."""
    if isinstance(values, str) or not isinstance(values, (list, tuple)):
        raise option_error(name, f"must be a list of names; got {values!r}")
    values = list(values)
    if not values:
        raise option_error(name, "must name at least one")
    duplicates = sorted({v for v in values if values.count(v) > 1})
    if duplicates:
        raise option_error(name, f"{duplicates} given more than once")
    for v in values:
        if valid is not None and v not in valid:
            raise option_error(name, f"unknown {what or name} {v!r}; valid: {', '.join(map(str, valid))}")
    return values


def _positive_dampings(name: str, values: Any) -> list[float]:
    with _about(name):
        out = check_dampings(values, name)
    if min(out) <= 0:
        raise option_error(name, f"every damping must be > 0; got {out}")
    return out


def _defaults(cls: type) -> dict[str, Any]:
    """Field name → default value of a configuration dataclass (factories called)."""
    out = {}
    for f in dataclasses.fields(cls):
        out[f.name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return out


@dataclass
class RunConfig:
    """What every command depends on: model, data, seed, device and dtype.

    Attributes:
        model: A built-in network (:data:`MODELS`) or the user's own, ``module:callable`` or
            ``path/to/file.py:callable`` (see :func:`load_model_and_data`).
        data: A built-in data set (:data:`DATA`) or the user's own, ``module:callable`` or
            ``path/to/file.py:callable``.
        n_samples: Training samples used (the first ``n_samples`` of the training split; None: all).
        seed: Seed of data split, initialisation and Monte-Carlo labels.
        device: Torch device (checked to exist on this machine).
        dtype: ``"float64"`` or ``"float32"``.
    """

    command: ClassVar[str] = ""

    model: str = "mlp"
    data: str = "digits"
    n_samples: int | None = None
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float64"

    def __post_init__(self) -> None:
        _check_name("model", self.model, MODELS)
        _check_name("data", self.data, DATA)
        if (self.model, self.data) in LAYOUTS and LAYOUTS[self.model, self.data] is None:
            raise option_error("data", f"model {self.model!r} does not take data {self.data!r}; use data mnist1d")
        _check_tokens(self.model, self.data)
        if self.n_samples is not None:
            with _about("n_samples"):
                self.n_samples = check_positive_int(self.n_samples, "n_samples")
        with _about("seed"):
            self.seed = check_positive_int(self.seed, "seed", minimum=0)
        with _about("device"):
            self.device = str(check_device(self.device))
        if self.dtype not in DTYPES:
            raise option_error("dtype", f"unknown dtype {self.dtype!r}; valid: {', '.join(DTYPES)}")

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Field name → default value (for help texts; builds nothing, imports no torch)."""
        return _defaults(cls)

    def torch_dtype(self) -> torch.dtype:
        """:attr:`dtype` as a torch dtype."""
        import torch

        return getattr(torch, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain values (for provenance and the output-folder manifest)."""
        return {"command": self.command, **dataclasses.asdict(self)}


@dataclass
class StudyConfig(RunConfig):
    """Everything a fidelity study depends on (recorded in every Dataset's provenance).

    Attributes (besides those of :class:`RunConfig`; ``n_samples`` defaults to 512 here):
        rules: Update rules compared with exact NGD at the initial parameters (``sngd-dense``: invariant 3 in the
            results, about 0.15 one-thread CPU s per damping for P = 3,466 with its Cholesky roots, R⁻¹ by
            triangular solves, once the exact NGD solve has factorised F + λI).
        damping: λ values (finite, > 0); the trajectory uses the middle one.
        lr: Learning rate η of every measured step.
        train_rule: The rule the training trajectory trains with (``sngd-<structure>``: a reconstructed
            network).
        train_lr: Learning rate of the trajectory's training steps (default 0.1: on the default study the
            training loss falls at every one of the 40 steps, 2.35 → 0.011; 0.15 and above overshoot,
            0.5 to a loss of 31 at step 5, after which the run is chaotic under round-off).
        steps: Training steps of the trajectory.
        every: Measure fidelity every ``every`` steps.
        refresh_every: Refresh interval of a reconstructed network when ``train_rule`` is ``sngd-*``.
        trajectory_rules: Rules measured along the trajectory.
        geometry_structures: Structures G whose preconditioned geometry is measured.
        geometry_damping: λ values of the geometry part (each costs one eigendecomposition per structure; default
            the trajectory's λ, the middle of ``damping``, so that the report shows one λ throughout).
        spectrum_kinds: Fisher kinds whose spectra are computed.
        parts: Parts of the study to run.
        optimizer: The user's optimizers added to the trajectory part, each a dotted class path
            (``torch.optim.AdamW``) or ``module:factory`` / ``path/to/file.py:factory``: a
            ``torch.optim.Optimizer`` subclass or a callable ``factory(params, **kwargs) -> Optimizer``. Each
            trains its own trajectory (same model, data, steps and ``every``), along which its update is measured
            against exact NGD as rule ``optimizer:<Class>`` (:func:`optimizer_rules_of`).
        optimizer_args: One list of ``key=value`` keyword arguments per optimizer (empty: its defaults), each
            value a Python literal read by ``ast.literal_eval`` (``lr=1e-3``, ``betas=(0.9, 0.95)``,
            ``nesterov=True``; nothing is evaluated); stored normalised (``lr=0.001``).
    """

    command: ClassVar[str] = "fidelity"

    n_samples: int | None = 512
    rules: list[str] = field(default_factory=lambda: ["gd", "adam", "ngd", "block-ngd", "kfac", "ekfac", "unit",
                                                      "diag", "empirical-ngd", "mc-ngd", "lowrank", "sngd-dense",
                                                      "sngd-block", "sngd-kfac"])
    damping: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1])
    lr: float = 0.1
    train_rule: str = "sngd-kfac"
    train_lr: float = 0.1
    steps: int = 40
    every: int = 4
    refresh_every: int = 10
    trajectory_rules: list[str] = field(default_factory=lambda: ["gd", "adam", "ngd", "block-ngd", "kfac", "diag",
                                                                 "empirical-ngd"])
    geometry_structures: list[str] = field(default_factory=lambda: ["block", "kfac", "diag"])
    geometry_damping: list[float] | None = None
    spectrum_kinds: list[str] = field(default_factory=lambda: ["true", "mc", "empirical"])
    parts: list[str] = field(default_factory=lambda: list(PARTS))
    optimizer: list[str] = field(default_factory=list)
    optimizer_args: list[list[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        from fisherlab.fidelity.rules import check_rules, get_rule

        self.parts = _check_names("parts", self.parts, PARTS, "study part")
        for name in ("rules", "trajectory_rules"):
            values = _check_names(name, getattr(self, name))
            with _about(name):
                setattr(self, name, list(check_rules(values)))  # registered names (deprecated spellings replaced)
        if not isinstance(self.train_rule, str):
            raise option_error("train_rule", f"must be a rule name; got {self.train_rule!r}")
        with _about("train_rule"):
            self.train_rule = get_rule(self.train_rule).name
        self.damping = _positive_dampings("damping", self.damping)
        self.geometry_damping = _positive_dampings(
            "geometry_damping", [self.trajectory_damping] if self.geometry_damping is None else self.geometry_damping)
        for name in ("lr", "train_lr"):
            with _about(name):
                setattr(self, name, check_lr(getattr(self, name), name))
        for name in ("steps", "every", "refresh_every"):
            with _about(name):
                setattr(self, name, check_positive_int(getattr(self, name), name))
        self.geometry_structures = _check_names("geometry_structures", self.geometry_structures, RECONSTRUCTIBLE,
                                                "structure")
        self.spectrum_kinds = _check_names("spectrum_kinds", self.spectrum_kinds, [k.value for k in FisherKind],
                                           "Fisher kind")
        self.optimizer, self.optimizer_args = _check_optimizers(self.optimizer, self.optimizer_args)
        with _about("optimizer"):
            clash = sorted(set(optimizer_rules_of(self)) & set(self.trajectory_rules))
        if clash:
            raise option_error("optimizer", f"rule name(s) {clash} are also in trajectory_rules")

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain values; ``optimizer`` and ``optimizer_args`` only when optimizers are given.

        (So that a folder written before optimizers existed resumes under the same configuration.)
        """
        out = super().to_dict()
        if not self.optimizer:
            del out["optimizer"], out["optimizer_args"]
        return out

    @property
    def trajectory_damping(self) -> float:
        """The λ of the trajectory part (and the geometry part's default): the middle of ``damping``."""
        return self.damping[len(self.damping) // 2]


@dataclass
class SpectraConfig(RunConfig):
    """Everything ``fisherlab spectra`` depends on (recorded in the Dataset's provenance).

    Attributes (besides those of :class:`RunConfig`):
        kinds: Fisher kinds.
        damping: λ values of the condition numbers κ(F + λI) (finite, ≥ 0).
        slq: The stochastic-Lanczos spectral density of the implicit Fisher instead of dense spectra.
        probes: SLQ probe vectors (with ``slq``).
        lanczos_steps: Lanczos steps per probe (with ``slq``).
    """

    command: ClassVar[str] = "spectra"

    kinds: list[str] = field(default_factory=lambda: ["true", "mc", "empirical"])
    damping: list[float] = field(default_factory=lambda: [0.0, 1e-4, 1e-3, 1e-2, 1e-1])
    slq: bool = False
    probes: int = 10
    lanczos_steps: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        self.kinds = _check_names("kinds", self.kinds, [k.value for k in FisherKind], "Fisher kind")
        with _about("damping"):
            self.damping = check_dampings(self.damping, "damping")
        if not isinstance(self.slq, bool):
            raise option_error("slq", f"must be true or false; got {self.slq!r}")
        for name in ("probes", "lanczos_steps"):
            with _about(name):
                setattr(self, name, check_positive_int(getattr(self, name), name))

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain values; ``probes`` and ``lanczos_steps`` only with ``slq``."""
        out = super().to_dict()
        if not self.slq:
            del out["probes"], out["lanczos_steps"]
        return out


# ------------------------------------------------------------------------------------------------ optimizers
def parse_optimizer_args(items: Any, spec: str = "") -> dict[str, Any]:
    """``["lr=1e-3", "betas=(0.9, 0.95)"]`` as keyword arguments, each value by ``ast.literal_eval`` (no eval).

    Raises:
        InputError: About ``optimizer_args`` (``.field``): an item that is not ``key=value`` with an identifier
            key, a value that is not a Python literal (a string needs quotes: ``mode='max'``), a key given twice.
    """
    import ast

    where = f" (of {spec})" if spec else ""
    if isinstance(items, str) or not isinstance(items, (list, tuple)):
        raise option_error("optimizer_args", f"must be a list of key=value{where}; got {items!r}")
    out: dict[str, Any] = {}
    for item in items:
        key, eq, text = str(item).partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise option_error("optimizer_args", f"{item!r}{where} is not key=value (e.g. lr=1e-3)")
        if key in out:
            raise option_error("optimizer_args", f"{key!r} given more than once{where}")
        try:
            out[key] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise option_error("optimizer_args", f"{item!r}{where}: {text.strip()!r} is not a Python literal "
                                                 "(numbers, True/False/None, tuples, quoted strings)") from None
    return out


def load_optimizer(spec: str) -> Callable[..., Any]:
    """The optimizer class or factory named by ``spec``.

    ``spec`` is a dotted path (``torch.optim.AdamW``: the longest prefix that imports is the module) or
    ``module:factory`` / ``path/to/file.py:factory`` (:func:`load_callable`).

    Raises:
        InputError: About ``optimizer``: nothing importable by that name, a class that is not a
            ``torch.optim.Optimizer`` subclass, an object that is not callable.
    """
    import torch

    if not isinstance(spec, str) or not spec.strip():
        raise option_error("optimizer", f"must be a class path or module:factory; got {spec!r}")
    if is_spec(spec):
        obj = load_callable(spec, "optimizer")
    else:
        parts = spec.split(".")
        if len(parts) < 2 or not all(p.isidentifier() for p in parts):
            raise option_error("optimizer", f"{spec!r} is not a dotted class path (torch.optim.AdamW) or "
                                            "module:factory")
        obj = None
        for i in range(len(parts) - 1, 0, -1):
            try:
                module = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            obj = module
            for attr in parts[i:]:
                obj = getattr(obj, attr, None)
            break
        if obj is None:
            raise option_error("optimizer", f"{spec!r}: no importable module holds it")
        if not callable(obj):
            raise option_error("optimizer", f"{spec!r} is a {type(obj).__name__}, not a class or factory")
    if isinstance(obj, type) and not issubclass(obj, torch.optim.Optimizer):
        raise option_error("optimizer", f"{spec!r} is the class {obj.__name__}, not a torch.optim.Optimizer "
                                        "subclass")
    return obj


def _check_optimizers(specs: Any, args: Any) -> tuple[list[str], list[list[str]]]:
    """``optimizer`` and ``optimizer_args`` validated: each built once on a test parameter, arguments normalised."""
    import torch

    from fisherlab.fidelity.optimizers import check_optimizer

    specs = [] if specs is None else specs
    args = [] if args is None else args
    if isinstance(specs, str) or not isinstance(specs, (list, tuple)):
        raise option_error("optimizer", f"must be a list of class paths or module:factory; got {specs!r}")
    if isinstance(args, str) or not isinstance(args, (list, tuple)):
        raise option_error("optimizer_args", f"must be a list of key=value lists, one per optimizer; got {args!r}")
    if args and not specs:
        raise option_error("optimizer_args", "given without an optimizer (--optimizer CLASS --optimizer-args ...)")
    if args and all(isinstance(a, str) for a in args) and len(specs) == 1:
        args = [args]  # one optimizer's arguments as a flat list
    if args and len(args) != len(specs):
        raise option_error("optimizer_args", f"{len(args)} argument lists for {len(specs)} optimizers: give one "
                                             "--optimizer-args after each --optimizer that takes arguments")
    args = [list(a) if isinstance(a, (list, tuple)) else a for a in (args or [[] for _ in specs])]
    out: list[list[str]] = []
    for spec, items in zip(specs, args, strict=True):
        cls = load_optimizer(spec)
        kwargs = parse_optimizer_args(items, spec)
        test = torch.zeros(2, 2, requires_grad=True)
        try:
            built = cls([test], **kwargs)
        except FisherlabError as exc:
            raise option_error("optimizer", f"{spec!r}: {exc}") from None
        except Exception as exc:
            name = "optimizer_args" if kwargs and isinstance(exc, (TypeError, ValueError)) else "optimizer"
            raise option_error(name, f"{spec}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) fails on a "
                                     f"test parameter: {type(exc).__name__}: {exc}") from None
        with _about("optimizer"):
            check_optimizer(built, f"{spec!r}")
        out.append([f"{k}={v!r}" for k, v in kwargs.items()])
    pairs = [(s, tuple(a)) for s, a in zip(specs, out, strict=True)]
    twice = sorted({s for s, a in pairs if pairs.count((s, a)) > 1})
    if twice:
        raise option_error("optimizer", f"{twice} given more than once with the same arguments")
    return list(specs), out


def optimizer_rules_of(cfg: StudyConfig) -> dict[str, Callable[..., Any]]:
    """Rule name → factory ``params -> Optimizer`` of each of ``cfg``'s optimizers, in the order given.

    The name is ``optimizer:<Class>`` (the factory's name for ``module:factory``); an optimizer given several
    times with different arguments is named with them, ``optimizer:AdamW(lr=0.01)``.
    """
    import functools

    from fisherlab.fidelity.optimizers import optimizer_name

    built = [(optimizer_name(load_optimizer(s)), s, a) for s, a in zip(cfg.optimizer, cfg.optimizer_args,
                                                                        strict=True)]
    names = [n for n, _, _ in built]
    out: dict[str, Callable[..., Any]] = {}
    for name, spec, items in built:
        if names.count(name) > 1:
            name = f"{name}({', '.join(items)})"
        if name in out:
            raise option_error("optimizer", f"two optimizers are both named {name!r}")
        out[name] = functools.partial(load_optimizer(spec), **parse_optimizer_args(items, spec))
    return out


# ------------------------------------------------------------------------------------------- model and data
def load_callable(spec: str, name: str) -> Callable[..., Any]:
    """The callable named by ``module:callable`` or ``path/to/file.py:callable`` (``name``: the field, for errors).

    A module is imported as usual, with the working directory on ``sys.path``; a ``.py`` file (or any path with a
    ``/``) is executed once per process as a module of its own.
    """
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise option_error(name, f"{spec!r}: no file {path}")
        module_name = "_fisherlab_user_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
        module = sys.modules.get(module_name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(module_name, path)
            assert loader_spec is not None and loader_spec.loader is not None
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[module_name] = module
            try:
                loader_spec.loader.exec_module(module)
            except Exception as exc:
                del sys.modules[module_name]
                raise option_error(name, f"{spec!r}: running {path} failed: {type(exc).__name__}: {exc}") from exc
    else:
        added = "" not in sys.path and str(Path.cwd()) not in sys.path
        if added:
            sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise option_error(name, f"{spec!r}: cannot import {target!r} ({exc})") from exc
        finally:
            if added:
                sys.path.remove(str(Path.cwd()))
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise option_error(name, f"{spec!r}: {target} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise option_error(name, f"{spec!r}: {attr} is a {type(obj).__name__}, not a callable")
    return obj


def _required_positional(fn: Callable[..., Any]) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 0
    return sum(p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
               for p in params)


def _takes_seed(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "seed" and p.kind is not p.POSITIONAL_ONLY or p.kind is p.VAR_KEYWORD for p in params)


def split_from_tensors(X: torch.Tensor, y: torch.Tensor, name: str) -> SplitData:
    """A :class:`~fisherlab.data.SplitData` whose training split is ``(X, y)`` (and whose test split is empty).

    ``y`` of dtype int64 and shape ``(N,)`` is a multiclass task with ``y.max() + 1`` classes; floating ``y`` of
    shape ``(N, k)`` is regression with k outputs. (Binary targets: build the SplitData yourself.)
    """
    import torch

    from fisherlab.data import SplitData

    if not (isinstance(X, torch.Tensor) and isinstance(y, torch.Tensor)):
        raise InputError(f"X and y must be torch tensors; got {type(X).__name__} and {type(y).__name__}")
    if not X.is_floating_point() or X.dim() < 2 or X.shape[0] < 1:
        raise InputError(f"X must be a floating tensor (N, *input_shape) with N ≥ 1; got {X.dtype} {tuple(X.shape)}")
    if not torch.isfinite(X).all():
        raise InputError("X holds NaN or infinite values")
    if y.dtype == torch.int64 and y.dim() == 1:
        if y.numel() and int(y.min()) < 0:
            raise InputError(f"class labels y must be ≥ 0; got {int(y.min())}")
        task, n_outputs = "multiclass", int(y.max()) + 1 if y.numel() else 1
    elif y.is_floating_point() and y.dim() == 2:
        if not torch.isfinite(y).all():
            raise InputError("y holds NaN or infinite values")
        task, n_outputs = "regression", int(y.shape[1])
    else:
        raise InputError("y must be int64 class labels of shape (N,) or floating regression targets of shape "
                         f"(N, k); got {y.dtype} {tuple(y.shape)} (binary targets: return a SplitData)")
    return SplitData(X_train=X, y_train=y, X_test=X[:0], y_test=y[:0], name=name, task=task, n_outputs=n_outputs,
                     input_shape=tuple(X.shape[1:]), meta={"source": name})


def _user_data(cfg: RunConfig) -> SplitData:
    import torch

    from fisherlab.data import SplitData

    fn = load_callable(cfg.data, "data")
    result = fn(seed=cfg.seed) if _takes_seed(fn) else fn()
    if isinstance(result, SplitData):
        return result
    if isinstance(result, (tuple, list)) and len(result) == 2 and all(isinstance(t, torch.Tensor) for t in result):
        with _about("data"):
            return split_from_tensors(*result, name=cfg.data)
    raise option_error("data", f"{cfg.data!r} returned {type(result).__name__}; it must return a "
                               "fisherlab.data.SplitData or a tuple (X, y) of tensors")


def _user_model(cfg: RunConfig, split: SplitData) -> torch.nn.Module:
    from torch import nn

    from fisherlab.models import seeded_init

    fn = load_callable(cfg.model, "model")
    n_args = _required_positional(fn)
    if n_args > 1:
        raise option_error("model", f"{cfg.model!r} takes {n_args} required arguments; it may take one (the data)")
    with seeded_init(cfg.seed):
        net = fn(split) if n_args else fn()
    if not isinstance(net, nn.Module):
        raise option_error("model", f"{cfg.model!r} returned {type(net).__name__}; it must return a "
                                    "torch.nn.Module")
    params = list(net.parameters())
    if not any(p.requires_grad for p in params):
        raise option_error("model", f"{cfg.model!r} returned a {type(net).__name__} with no trainable parameters")
    odd = sorted({str(p.dtype) for p in params if not p.is_floating_point()})
    if odd:
        raise option_error("model", f"{cfg.model!r}: parameters of dtype {odd}; they must be floating")
    return net


def _check_forward(cfg: RunConfig, net: torch.nn.Module, split: SplitData) -> None:
    import torch

    batch = split.X_train[:2]
    try:
        with torch.no_grad():
            out = net(batch)
    except Exception as exc:
        raise option_error("model", f"{cfg.model!r} fails on a batch of shape {tuple(batch.shape)} of data "
                                    f"{cfg.data!r}: {type(exc).__name__}: {exc}") from exc
    want = (batch.shape[0], split.n_outputs)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise option_error("model", f"{cfg.model!r} maps a batch {tuple(batch.shape)} of data {cfg.data!r} to "
                                    f"{got}; the study needs (batch, n_outputs) = {want}")


def load_model_and_data(cfg: RunConfig) -> tuple[torch.nn.Module, SplitData]:
    """The seeded model (eval mode) and the data of ``cfg``, on ``cfg.device`` in ``cfg.dtype``.

    Built-in names load :func:`fisherlab.data.load` and :func:`fisherlab.models.build_model`. The user's own:

    * ``data`` names a callable taking no argument (or a keyword ``seed``, which receives ``cfg.seed``) that
      returns a :class:`fisherlab.data.SplitData` or a tuple ``(X, y)`` of tensors — X floating
      ``(N, *input_shape)``; y int64 class labels ``(N,)`` (multiclass, ``y.max() + 1`` classes) or floating
      regression targets ``(N, k)``. Only the training split is used by the study.
    * ``model`` names a callable taking no argument or one (the :class:`~fisherlab.data.SplitData`, for shapes)
      that returns a :class:`torch.nn.Module` mapping ``(B, *input_shape)`` to ``(B, n_outputs)``. It is called
      inside :func:`fisherlab.models.seeded_init` (parameters drawn in float32 from ``cfg.seed``), then cast.

    Raises:
        InputError: Naming the field (``.field``): a callable that cannot be found or returns the wrong thing, a
            model whose output does not fit the data, more ``n_samples`` than training samples.
    """
    from fisherlab import data as fdata
    from fisherlab.models import build_model

    dtype = cfg.torch_dtype()
    if is_spec(cfg.data):
        split = _user_data(cfg)
    else:
        kwargs: dict[str, Any] = {"seed": cfg.seed}
        if (cfg.model, cfg.data) in LAYOUTS:
            kwargs["layout"] = LAYOUTS[cfg.model, cfg.data]
        split = fdata.load(cfg.data, **kwargs)
    if cfg.n_samples is not None:
        if cfg.n_samples > split.n_train:
            raise option_error("n_samples", f"{cfg.n_samples} is more than the {split.n_train} training samples of "
                                            f"data {cfg.data!r}")
        split = split.train_subset(cfg.n_samples)
    split = split.to(device=cfg.device, dtype=dtype)
    if is_spec(cfg.model):
        net = _user_model(cfg, split).to(device=cfg.device, dtype=dtype).eval()
        _check_forward(cfg, net, split)
    else:
        net = build_model(cfg.model, split, seed=cfg.seed, dtype=dtype, device=cfg.device,
                          **MODEL_OPTIONS.get(cfg.model, {})).eval()
    return net, split


def likelihood_for(split: SplitData) -> str:
    """The likelihood matching a data set's task."""
    return {"multiclass": "categorical", "binary": "bernoulli", "regression": "gaussian"}[split.task]


def _log(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message)  # above any progress bar shown


def _other_code(attrs: dict[str, Any], code: dict[str, str]) -> str:
    """``"; written by other code: …"`` when a kept part was computed by other fisherlab code, else ``""``.

    Other code: its ``fisherlab_version`` or ``git_commit`` attrs differ from ``code``'s
    (:func:`~fisherlab.results.metadata.code_provenance`; "unknown" on either side is no difference). A resumed
    study keeps every part that carries its configuration; this says when such a part was computed by other code,
    so that a folder mixing two versions' results does not pass unnoticed.
    """
    differ = [key for key, now in code.items()
              if "unknown" not in (now, str(attrs.get(key, "unknown"))) and str(attrs.get(key)) != now]
    if not differ:
        return ""
    width = {"git_commit": 12}  # a commit by its first 12 hex digits
    return "; written by other code: " + ", ".join(
        f"{key} {str(attrs[key])[:width.get(key)]} (this run: {code[key][:width.get(key)]})" for key in differ)


def run_study(cfg: StudyConfig, out: str | Path, *, progress: bool | None = None,
              log: Callable[[str], None] = _log,
              model_and_data: tuple[torch.nn.Module, SplitData] | None = None,
              saved: Callable[[Path], None] | None = None) -> dict[str, xr.Dataset]:
    """Run the parts of the study not yet in ``out`` and save each as ``out/<part>.nc`` when it finishes.

    Args:
        cfg: The configuration.
        out: The output folder.
        progress: Progress bars (None: only when stderr is a terminal): one for the parts, one below it for
            the part running when that part has one (trajectory steps, spectra).
        log: Where the one-line messages of each part go (default: standard output, above the bars).
        model_and_data: ``load_model_and_data(cfg)`` when the caller has it already.
        saved: Called with the path of each part's Dataset in ``out`` once it is there (on rank 0): a part kept
            from an earlier run at the start, a computed one as soon as it is saved (from the thread of its lane
            when parts run side by side), e.g. to draw its figures meanwhile (``fisherlab fidelity``).

    Returns:
        ``{part: Dataset}`` for every part of ``cfg.parts`` (on every rank of a data-parallel run).

    **Side by side**: the first part to compute runs alone on all of torch's intra-op threads (the fidelity part:
    it fills the shared context); on the CPU of a single process with at least two threads, the parts after it
    run in two lanes at once (:func:`fisherlab.linalg.threads.side_by_side`, each lane on half the threads): the
    trajectory and then the spectrum in one, the geometry in the other (:func:`part_lanes`). They share the
    context's computed objects (the parts other than the trajectory read them through a view on a copy of the
    model, :func:`context_view`) and compute what they did one after the other (an object two parts ask for at
    once, e.g. the true Fisher's spectra, may be computed by both: the same values); a part's log line gives its
    own thread's CPU seconds when its lane has one thread. Default study, MLP on digits, 2 quiet cores:
    benchmarks/README.md ("The default main job").

    **Data-parallel** (under ``torch.distributed`` with more than one process, e.g. ``torchrun``): every rank
    loads the same model and data, takes its contiguous shard of the training samples
    (:func:`fisherlab.distributed.shard`) and computes every part on it (the engines all-reduce sums and counts,
    so the values are those of one process); rank 0 alone reads the finished parts, logs and writes, and the
    Datasets carry ``world_size`` and ``backend``. Rules on reconstructed networks (``sngd-*``, and such a
    ``train_rule``) run there too: their gradient is all-reduced (``ReconstructedNetwork.prime_gradient``).
    """
    import torch

    from fisherlab.distributed import active_group, on_lead, rank
    from fisherlab.fidelity import evaluate_fidelity, fidelity_trajectory, fisher_geometry
    from fisherlab.fidelity.optimizers import OptimizerRule
    from fisherlab.fidelity.rules import RuleContext
    from fisherlab.linalg.threads import lane_threads, side_by_side
    from fisherlab.progress import bar as progress_bar
    from fisherlab.results import ResultsStore, save_dataset
    from fisherlab.results.metadata import code_provenance
    from fisherlab.spectra import fisher_spectra

    out = Path(out)
    dtype = cfg.torch_dtype()
    model, split = load_model_and_data(cfg) if model_and_data is None else model_and_data
    group = active_group()
    lead = True
    if group is not None:
        split, lead = shard_split(split, group), rank(group) == 0
        if not lead:
            log, progress = _quiet, False
    lik = likelihood_for(split)
    # one context at the initial parameters: the trajectory's step 0, the geometry and the spectra reuse the
    # Fishers, structures, solves and eigenvalues the fidelity part computed (each computed once, when first asked)
    shared = RuleContext(model, split, lik, dtype=dtype, device=cfg.device, seed=cfg.seed, progress=progress,
                         dampings=tuple(cfg.damping))
    common = {"likelihood": lik, "dtype": dtype, "device": cfg.device, "seed": cfg.seed, "progress": progress,
              "config": cfg.to_dict()}
    jobs: dict[str, Callable[[torch.nn.Module, RuleContext], xr.Dataset]] = {
        "fidelity": lambda net, ctx: evaluate_fidelity(net, split, rules=cfg.rules, damping=cfg.damping, lr=cfg.lr,
                                                       context=ctx, **common),
        "trajectory": lambda net, ctx: with_optimizers(fidelity_trajectory(
            net, split, train_rule=cfg.train_rule, steps=cfg.steps, every=cfg.every,
            rules=cfg.trajectory_rules, damping=cfg.trajectory_damping, lr=cfg.lr,
            train_lr=cfg.train_lr, refresh_every=cfg.refresh_every, context=ctx, **common), [
            fidelity_trajectory(net, split, optimizer=OptimizerRule(name, factory), steps=cfg.steps,
                                every=cfg.every, rules=[], damping=cfg.trajectory_damping, lr=cfg.lr, **common)
            for name, factory in optimizer_rules_of(cfg).items()]),
        "geometry": lambda net, ctx: fisher_geometry(net, split, structures=cfg.geometry_structures,
                                                     damping=cfg.geometry_damping, context=ctx, **common),
        "spectrum": lambda net, ctx: fisher_spectra(net, split, lik, kinds=cfg.spectrum_kinds, seed=cfg.seed,
                                                    dtype=dtype, device=cfg.device, progress=progress,
                                                    config=cfg.to_dict(), context=ctx),
    }
    store = ResultsStore(out)
    # reused only if it carries this configuration (a foreign part is refused); read by rank 0 for every rank
    finished = on_lead(lambda: {part: store.load(part, config=cfg.to_dict()) for part in cfg.parts
                                if store.has(part)}, group)
    results: dict[str, xr.Dataset] = {}
    code = code_provenance() if finished else {}
    todo = [part for part in cfg.parts if part not in finished]
    lanes = part_lanes(todo[1:]) if group is None else []
    threads = lane_threads(len(lanes), torch.device(cfg.device))  # each lane's; 0: the parts one after the other
    lanes = lanes if threads >= 1 else []
    beside = {part: [p for other in lanes if part not in other for p in other] for lane in lanes for part in lane}
    # the parts beside the trajectory: a copy of the model (made before the lanes start) and a view of the context
    twin = copy.deepcopy(model) if lanes else model
    view = context_view(shared, twin) if lanes else shared

    def run(part: str, parts: Any) -> None:
        start, cpu = time.perf_counter(), time.thread_time() if part in beside else time.process_time()
        log(f"[{part}] running ...")
        ds = jobs[part](twin, view) if part in beside and part != "trajectory" else jobs[part](model, shared)
        if lead:
            save_dataset(ds, store.path(part))
            if saved is not None:
                saved(store.path(part))
        results[part] = ds
        seconds = time.perf_counter() - start
        if part not in beside:
            note = f" ({time.process_time() - cpu:.1f} CPU-s, all threads)"
        else:
            note = (f" ({time.thread_time() - cpu:.1f} CPU-s, one thread" if threads == 1 else " (") + \
                   f" beside {', '.join(beside[part])})"
        log(f"[{part}] done in {seconds:.1f} s{note} -> {store.path(part)}")
        parts.update(1)

    with progress_bar(total=len(cfg.parts), desc="fidelity study", progress=progress) as parts, _collect_only_new():
        for part in cfg.parts:
            if part in finished:
                results[part] = finished[part]
                log(f"[{part}] already in {out}: kept (delete {store.path(part)} to recompute)"
                    f"{_other_code(finished[part].attrs, code)}")
                if lead and saved is not None:
                    saved(store.path(part))
                parts.update(1)
        for part in todo[:1] if lanes else todo:
            parts.set_postfix_str(part)
            run(part, parts)
        if lanes:
            parts.set_postfix_str(" | ".join(", ".join(lane) for lane in lanes))
            side_by_side([partial(_in_turn, lane, partial(run, parts=parts)) for lane in lanes],
                         torch.device(cfg.device))
    return {part: results[part] for part in cfg.parts}


@contextmanager
def _collect_only_new() -> Iterator[None]:
    """The garbage collector ignores the objects that exist on entry (modules, model, data) until exit.

    ``gc.freeze`` on entry, ``gc.unfreeze`` on exit: a full collection during the study then visits only what the
    study made (the default study's three took 0.51 s, 0.12 s so; each holds the GIL, so both lanes wait). Nothing
    is done when objects are frozen already (a process forked from one that froze its heap keeps it so).
    """
    import gc

    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def part_lanes(parts: list[str]) -> list[list[str]]:
    """The lanes :func:`run_study` runs ``parts`` in side by side: the geometry alone, the others in order.

    The geometry is the longest part on one thread (its eigenvalue problems); the others (the trajectory, then the
    spectrum, which reads the true Fisher's spectra the geometry computes first) take about as long together. No
    lanes (``[]``: one after the other) when that leaves fewer than two, e.g. without the geometry.
    """
    lanes = [[p for p in parts if p != "geometry"], [p for p in parts if p == "geometry"]]
    lanes = [lane for lane in lanes if lane]
    return lanes if len(lanes) > 1 else []


def context_view(ctx: RuleContext, twin: torch.nn.Module) -> RuleContext:
    """A context on ``twin`` (a copy of ``ctx.model``) sharing ``ctx``'s computed objects, for a part beside ``ctx``'s.

    The same caches (Fishers, structures, sample Grams, solves, eigenvalues, reconstructed networks), but engines
    of its own on ``twin`` (built when first asked: a forward pass by ``torch.func.functional_call`` swaps the
    parameters of the module it runs in place for the call, so two threads must not run one module) and
    ``timings`` of its own (the trajectory's ``timings`` are the differences of its context's phases around its
    steps; another part's phases added meanwhile would count as the trajectory's).
    """
    return dataclasses.replace(ctx, model=twin, timings={}, _engines={})


def _in_turn(parts: list[str], run: Callable[[str], None]) -> None:
    """``run`` of each of ``parts``, one after the other (one lane of :func:`run_study`)."""
    for part in parts:
        run(part)


def _quiet(message: str) -> None:
    """The log of a rank other than 0 in a data-parallel run: nothing."""


def shard_split(split: SplitData, group: Any) -> SplitData:
    """The contiguous shard of the training split this rank takes (:func:`fisherlab.distributed.shard`).

    The test split is kept whole.

    Raises:
        InputError: Fewer training samples than ranks.
    """
    from fisherlab.distributed import rank, shard, world_size

    mine = shard(split.n_train, rank(group), world_size(group))
    return dataclasses.replace(split, X_train=split.X_train[mine.start: mine.stop],
                               y_train=split.y_train[mine.start: mine.stop])


def with_optimizers(main: xr.Dataset, runs: list[xr.Dataset]) -> xr.Dataset:
    """The trajectory part: ``main`` (the ``train_rule`` run) with each optimizer's own run added as its rule.

    Every variable with a ``rule`` dim gains the optimizers' rules (each optimizer's ``"optimizer:<Class>"`` row,
    measured along the run it trained itself); the run-wide variables (``loss``, ``grad_norm``, the NGD solver's
    diagnostics, ``steps_since_refresh``) and the attributes stay ``main``'s. Two variables say which run each
    rule was measured along: the coordinate ``trained_with`` (rule; ``main``'s ``train_rule`` for the built-in
    rules, the optimizer's rule for its own row) and ``training_loss`` (step, rule), the training loss of that
    run at each step. Without optimizers, ``main`` is returned unchanged.

    Args:
        main: The ``fidelity_trajectory`` Dataset trained with the study's ``train_rule``.
        runs: One ``fidelity_trajectory(optimizer=...)`` Dataset per optimizer, measuring only the optimizer's
            rule, on the same steps and damping.
    """
    import xarray as xr

    if not runs:
        return main
    for run in runs:
        if list(run.step.values) != list(main.step.values) or list(run.damping.values) != list(main.damping.values):
            raise InputError("an optimizer's trajectory was measured on other steps or dampings than the study's")
    by_rule = [v for v in main.data_vars if "rule" in main[v].dims]
    parts = [main[by_rule].assign_coords(trained_with=("rule", [main.attrs["train_rule"]] * main.sizes["rule"]))]
    parts += [run[by_rule].assign_coords(trained_with=("rule", [run.attrs["train_rule"]] * run.sizes["rule"]))
              for run in runs]
    loss = [xr.DataArray(np.repeat(main.loss.values[:, None], main.sizes["rule"], axis=1), dims=("step", "rule"))]
    loss += [xr.DataArray(run.loss.values[:, None].repeat(run.sizes["rule"], axis=1), dims=("step", "rule"))
             for run in runs]
    merged = xr.concat(parts, dim="rule", data_vars="all", coords="different", compat="equals", join="exact",
                       combine_attrs="override")
    out = main.drop_vars(by_rule).drop_dims("rule").merge(merged, combine_attrs="override")
    out["training_loss"] = xr.concat(loss, dim="rule").assign_coords(rule=out.rule, step=out.step)
    out["training_loss"].attrs.update({**main.loss.attrs, "long_name": "training loss of the run the rule was "
                                       "measured along"})
    out["trained_with"].attrs.update(long_name="the training run the rule was measured along")
    out.attrs.update(main.attrs)
    out.attrs["total_seconds"] = float(main.attrs["total_seconds"]) + sum(float(r.attrs["total_seconds"])
                                                                         for r in runs)
    return out


def own_run_rules(ds: xr.Dataset) -> list[str]:
    """The rules of a trajectory Dataset measured along a training run of their own (``trained_with``)."""
    if "trained_with" not in ds.coords:
        return []
    train = ds.attrs.get("train_rule", "")
    return [str(r) for r, t in zip(ds.rule.values, ds.trained_with.values, strict=True) if str(t) != train]


def headline(results: dict[str, xr.Dataset], *, damping: float | None = None) -> tuple[list[str], list[list[str]]]:
    """What the study found, as a table with one row per rule, every column at one damping λ.

    :func:`fisherlab.report.build_report` opens the report with it and ``fisherlab fidelity`` prints it. Columns:
    the cosine similarity of the rule's update to exact NGD at the initial parameters (fidelity part); the same
    after the last step of the training trajectory (trajectory part; the update the training took, with its
    reconstructed network's stale metric G, is the row ``<rule> (as trained, stale G)``); the condition number κ
    of G^-1/2 (F + λI) G^-1/2, the Fisher plain GD sees on the network reconstructed with the rule's structure G
    (geometry part: ``gd`` is the original network, G = I; structure ``s`` is the rule ``sngd-<s>``). Each
    column's header names its λ: the Datasets' damping nearest to ``damping``. A rule measured along a training
    run of its own (the user's optimizer, :func:`with_optimizers`) is the row ``<rule> (its own training run)``,
    its trajectory value after as many steps of that run. Rows are sorted by the first
    column, the trained row right after its rule; "—": the part did not measure the rule; "n/a": the rule could
    not be evaluated; "diverged": the trajectory diverged before its last step.

    Args:
        results: Datasets by any names (e.g. what :func:`run_study` returns, or a folder's files); the fidelity,
            trajectory and geometry Datasets are found by their kind, the others are ignored.
        damping: λ of the columns (None: :func:`fisherlab.report.study_damping`, the trajectory's damping).

    Returns:
        ``(header, rows)`` of strings; both empty when ``results`` holds none of the three parts.
    """
    from fisherlab.report import nearest_damping, rule_label, study_damping

    by_kind = {ds.attrs.get("fisherlab_kind"): ds for ds in results.values()}
    fid, traj, geo = (by_kind.get(k) for k in ("fidelity", "fidelity_trajectory", "geometry"))
    if fid is None and traj is None and geo is None:
        return [], []
    lam = study_damping(results.values()) if damping is None else damping
    columns: list[tuple[str, dict[str, float], str, str]] = []  # (header, {rule: value}, format, text for NaN)
    if fid is not None:
        d = nearest_damping(fid, lam)
        cos = fid.cosine.sel(damping=d)
        columns.append((f"cosine to NGD at start (λ={d:g})", {str(r): float(cos.sel(rule=r)) for r in fid.rule.values},
                        ".3f", "n/a"))
    if traj is not None:
        cos = traj.cosine
        d = None
        if "damping" in cos.dims:
            d = nearest_damping(traj, lam)
            cos = cos.sel(damping=d)
        last = cos.isel(step=-1)
        diverged = int(traj.attrs.get("diverged_at_step", -1)) >= 0
        train = traj.attrs.get("train_rule", "")
        at = f" (λ={d:g})" if d is not None else ""
        columns.append((f"cosine after {int(traj.step.values[-1])} {train} steps{at}",
                        {str(r): float(last.sel(rule=r)) for r in traj.rule.values}, ".3f",
                        "diverged" if diverged else "n/a"))
    if geo is not None:
        d = nearest_damping(geo, lam)
        kappa = geo.condition_number.sel(damping=d)
        columns.append((f"κ seen by GD (λ={d:g})", {"gd" if s == "original" else f"sngd-{s}": float(kappa.sel(
            structure=s)) for s in geo.structure.values}, ".3g", "n/a"))
    rules = list(dict.fromkeys(r for _, values, _, _ in columns for r in values))

    def first(rule: str) -> float:
        value = columns[0][1].get(rule, np.nan)
        return -value if np.isfinite(value) else np.inf

    def order(rule: str) -> tuple[float, int]:
        base = rule.removeprefix("train:")
        return first(base if base in rules else rule), int(rule != base)

    def cell(rule: str, values: dict[str, float], fmt: str, nan: str) -> str:
        if rule not in values:
            return "—"
        return nan if np.isnan(values[rule]) else format(values[rule], fmt)

    own = set() if traj is None else own_run_rules(traj)

    def label(rule: str) -> str:
        return f"{rule_label(rule)} (its own training run)" if rule in own else rule_label(rule)

    rows = [[label(r), *[cell(r, *column[1:]) for column in columns]] for r in sorted(rules, key=order)]
    return ["rule", *[column[0] for column in columns]], rows
