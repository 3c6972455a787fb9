"""The ``fisherlab`` command line.

Subcommands (their help texts are plain text, written for the terminal; this docstring is for developers):

* ``fisherlab fidelity`` — the main job: how closely update rules track exact NGD, with figures and an HTML
  report (:mod:`fisherlab.study`, :mod:`fisherlab.report`), drawn while the study computes by a process of its
  own (:class:`ReportProcess`).
* ``fisherlab spectra`` — Fisher spectra and condition numbers (``--slq``: the stochastic-Lanczos spectral
  density instead, for models too large for dense spectra).
* ``fisherlab report FOLDER`` — rebuild the HTML report of a folder from its saved Datasets.

Every option of a study subcommand is a field of its configuration (:class:`~fisherlab.study.StudyConfig`,
:class:`~fisherlab.study.SpectraConfig`), whose defaults the help shows — except how a run under ``torchrun`` talks
(``--backend``, ``--timeout`` of ``fisherlab fidelity``, :func:`fisherlab.distributed.launched`), which does not
change the results. Options also come from a TOML or YAML
file (``--config``); its values go through the same argparse conversion (type, choices, nargs) as flags, and the
configuration is built and fully validated before the output folder is claimed.

The module imports no torch: ``fisherlab --help`` and ``--version`` answer at once, and each subcommand imports
what it needs when it runs.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from fisherlab.errors import FisherlabError, InputError
from fisherlab.study import DATA, DTYPES, MODELS, PARTS, RunConfig, SpectraConfig, StudyConfig, model_defaults
from fisherlab.vocabulary import RECONSTRUCTIBLE, Backend, FisherKind

if TYPE_CHECKING:
    from torch import nn

DESCRIPTION = "Fisher geometry for deep learning: how closely update rules track exact natural gradient descent."

CONFIG_HELP = """\
Options can also come from a configuration file, --config run.toml (or .yaml, .yml),
whose keys are the long option names with - or _, e.g. n-samples = 256,
rules = ["gd", "kfac"], overwrite = false. File values are checked like the same
options on the command line; options given on the command line win."""

OWN_MODEL_HELP = """\
Your own model and data: --model and --data also take module:callable or
path/to/file.py:callable.
  data   a callable with no argument (or a keyword seed, which receives --seed)
         returning a fisherlab.data.SplitData or a tuple (X, y) of tensors:
         X float (N, ...); y int64 class labels (N,) or float regression
         targets (N, k).
  model  a callable with no argument or one (the SplitData) returning a
         torch.nn.Module that maps a batch (B, ...) to (B, outputs). Its
         parameters are drawn in float32 from --seed, then cast to --dtype.
The spec string is recorded in the results' configuration."""


OPTIMIZER_HELP = """\
Your own optimizers: --optimizer torch.optim.AdamW --optimizer-args lr=1e-3
weight_decay=0.01 trains a second run with AdamW (same model, data, --steps and
--every) and measures, every --every steps, the update AdamW takes there against
exact NGD (rule optimizer:AdamW in trajectory.nc; the report draws it beside the
rules of the --train-rule run). Repeat --optimizer for several, each followed by
its own --optimizer-args; --optimizer A B adds several with their defaults.
CLASS is a dotted class path (a torch.optim.Optimizer subclass) or
module:factory / file.py:factory, a callable factory(params, **kwargs)
returning one. Argument values are Python literals (nothing is evaluated).
In a configuration file: optimizer = ["torch.optim.AdamW"],
optimizer-args = [["lr=1e-3", "weight_decay=0.01"]]."""


def paragraph(text: str) -> str:
    """``text`` filled to the help width (descriptions are shown as written)."""
    import textwrap

    return textwrap.fill(text, HELP_WIDTH)


#: Default of ``--timeout``: seconds a rank of a run under torchrun waits in a collective for the others.
DISTRIBUTED_TIMEOUT_S = 600.0

TORCHRUN_HELP = """\
Data-parallel: torchrun --nproc-per-node N -m fisherlab fidelity ... (or
torchrun --no-python ... fisherlab fidelity ...) shards the training samples
over the N ranks (and --nnodes nodes), computes on all of them and writes the
results once, from rank 0, with world_size and backend in each Dataset's
attributes; the values are those of one process. A rank that fails stops every
rank with an error naming it; finished parts stay in --out."""

#: Width of the hand-wrapped help texts.
HELP_WIDTH = 80


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help that shows every option's default (lists as typed on the command line)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (action.option_strings and default not in (None, argparse.SUPPRESS) and not isinstance(default, bool)
                and default != []):
            text += f" (default: {show(default)})".replace("%", "%%")
        return text


def show(value: Any) -> str:
    """A default value as it would be typed on the command line (lists space-separated, floats short)."""
    if isinstance(value, (list, tuple)):
        return " ".join(show(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def samples(text: str) -> int | None:
    """``--n-samples``: a count, or ``all``."""
    if text == "all":
        return None
    return int(text)


def package_version() -> str:
    """The installed version of fisherlab (package metadata; no torch)."""
    from importlib import metadata

    try:
        return metadata.version("fisherlab")
    except metadata.PackageNotFoundError:
        import fisherlab

        return fisherlab.__version__


# ------------------------------------------------------------------------------------------------ options
class RenamedOption(argparse.Action):
    """The old spelling of an option: stores into the new option's destination and says so on stderr."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, new: str, **kwargs: Any) -> None:
        self.new = new
        self.quiet = False
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if not self.quiet:
            print(f"fisherlab: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_renamed(p: argparse.ArgumentParser, renamed: dict[str, str]) -> None:
    """Accept each old option spelling (hidden from the help) for the new option it names."""
    actions = {opt: a for a in p._actions for opt in a.option_strings}
    for old, new in renamed.items():
        a = actions[new]
        p.add_argument(old, dest=a.dest, action=RenamedOption, new=new, nargs=a.nargs, type=a.type, choices=a.choices,
                       metavar=a.metavar, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


class OptimizerOption(argparse.Action):
    """``--optimizer SPEC [SPEC ...]`` (repeatable): appends optimizers, each with an empty argument list."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        specs = list(getattr(namespace, "optimizer", None) or [])
        args = [list(a) for a in getattr(namespace, "optimizer_args", None) or []]
        args += [[] for _ in range(len(specs) - len(args))]
        for spec in values:
            specs.append(spec)
            args.append([])
        namespace.optimizer, namespace.optimizer_args = specs, args


class OptimizerArgsOption(argparse.Action):
    """``--optimizer-args KEY=VALUE ...``: keyword arguments of the optimizer named last before it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        specs = getattr(namespace, "optimizer", None) or []
        if not specs:
            raise argparse.ArgumentError(self, "comes after the --optimizer whose arguments it gives")
        args = [list(a) for a in getattr(namespace, "optimizer_args", None) or []]
        args += [[] for _ in range(len(specs) - len(args))]
        args[-1] += list(values)
        namespace.optimizer_args = args


def add_common(p: argparse.ArgumentParser, defaults: dict[str, Any], *, out: str) -> None:
    """Options shared by the study subcommands: the fields of :class:`~fisherlab.study.RunConfig`, and more."""
    p.add_argument("--config", metavar="FILE", help="TOML or YAML file with option values (command line wins)")
    p.add_argument("--model", default=defaults["model"],
                   help=f"network: {', '.join(MODELS)}, or your own as module:callable or file.py:callable "
                        "(gpt and encoder take token data and change the defaults of the options not given: "
                        "gpt data sort-lm, encoder data sort, 32 sequences, a short trajectory trained by kfac)")
    p.add_argument("--data", default=defaults["data"],
                   help=f"data set: {', '.join(DATA)}, or your own as module:callable or file.py:callable")
    n = defaults["n_samples"]
    p.add_argument("--n-samples", type=samples, default=n, metavar="N",
                   help="use the first N training samples, or all" + (" (default: all)" if n is None else ""))
    p.add_argument("--seed", type=int, default=defaults["seed"],
                   help="seed of data split, initialisation and sampling")
    p.add_argument("--device", default=defaults["device"], help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--dtype", default=defaults["dtype"], choices=DTYPES, help="compute dtype")
    p.add_argument("--out", default=out, help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace results in --out even if they come from a different configuration")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_fidelity_options(p: argparse.ArgumentParser) -> None:
    """Options of ``fisherlab fidelity``: the fields of :class:`~fisherlab.study.StudyConfig`."""
    d = StudyConfig.defaults()
    kinds = [k.value for k in FisherKind]
    add_common(p, d, out="results/fidelity")
    p.add_argument("--rules", nargs="+", default=d["rules"], metavar="RULE",
                   help="update rules compared with exact NGD; a wrong name lists the valid ones")
    p.add_argument("--damping", nargs="+", type=float, default=d["damping"], metavar="λ",
                   help="damping values λ > 0 (the trajectory uses the middle one)")
    p.add_argument("--lr", type=float, default=d["lr"], help="learning rate of the measured steps")
    p.add_argument("--train-rule", default=d["train_rule"], metavar="RULE",
                   help="the rule the training trajectory trains with (sngd-<structure>: a reconstructed network)")
    p.add_argument("--train-lr", type=float, default=d["train_lr"], help="learning rate of the trajectory")
    p.add_argument("--steps", type=int, default=d["steps"], help="training steps of the trajectory")
    p.add_argument("--every", type=int, default=d["every"], help="measure fidelity every N steps")
    p.add_argument("--refresh-every", type=int, default=d["refresh_every"],
                   help="refresh interval of a reconstructed network (sngd-* train methods)")
    p.add_argument("--trajectory-rules", nargs="+", default=d["trajectory_rules"], metavar="RULE",
                   help="rules measured along the trajectory")
    p.add_argument("--geometry-structures", nargs="+", default=d["geometry_structures"], choices=RECONSTRUCTIBLE,
                   metavar="STRUCTURE", help=f"structures G of the geometry part: {', '.join(RECONSTRUCTIBLE)}")
    p.add_argument("--geometry-damping", nargs="+", type=float, default=d["geometry_damping"], metavar="λ",
                   help="λ values of the geometry part (default: the trajectory's λ, the middle --damping)")
    p.add_argument("--spectrum-kinds", nargs="+", default=d["spectrum_kinds"], choices=kinds, metavar="KIND",
                   help=f"Fisher kinds of the spectrum part: {', '.join(kinds)}")
    p.add_argument("--parts", nargs="+", default=d["parts"], choices=PARTS, metavar="PART",
                   help=f"parts of the study to run: {', '.join(PARTS)}")
    p.add_argument("--optimizer", nargs="+", action=OptimizerOption, default=None, metavar="CLASS",
                   help="your optimizer(s) added to the trajectory part, each training its own run: a class path "
                        "(torch.optim.AdamW) or module:factory; repeat the option for several")
    p.add_argument("--optimizer-args", nargs="+", action=OptimizerArgsOption, default=None, metavar="KEY=VALUE",
                   help="keyword arguments of the --optimizer named just before, each value a Python literal "
                        "(lr=1e-3 betas=(0.9,0.95) nesterov=True)")
    p.add_argument("--backend", default=Backend.AUTO.value, choices=[b.value for b in Backend],
                   help="torch.distributed backend under torchrun: auto is nccl on cuda devices, else gloo")
    p.add_argument("--timeout", type=float, default=DISTRIBUTED_TIMEOUT_S, metavar="SECONDS",
                   help="under torchrun: how long a rank waits for the others in a collective before the run "
                        "stops with an error naming the silent rank")
    add_renamed(p, {"--dampings": "--damping", "--train-method": "--train-rule",
                    "--geometry-dampings": "--geometry-damping"})


def add_spectra_options(p: argparse.ArgumentParser) -> None:
    """Options of ``fisherlab spectra``: the fields of :class:`~fisherlab.study.SpectraConfig`."""
    d = SpectraConfig.defaults()
    kinds = [k.value for k in FisherKind]
    add_common(p, d, out="results/spectra")
    p.add_argument("--kinds", nargs="+", default=d["kinds"], choices=kinds, metavar="KIND",
                   help=f"Fisher kinds: {', '.join(kinds)}")
    p.add_argument("--damping", nargs="+", type=float, default=d["damping"], metavar="λ",
                   help="λ values of the condition numbers κ(F + λI)")
    p.add_argument("--slq", action="store_true",
                   help="spectral density by stochastic Lanczos quadrature on the implicit Fisher, for models whose "
                        "P×P Fisher does not fit (writes spectral_density.nc)")
    p.add_argument("--probes", type=int, default=d["probes"], help="SLQ probes (with --slq)")
    p.add_argument("--lanczos-steps", type=int, default=d["lanczos_steps"],
                   help="Lanczos steps per probe (with --slq)")
    add_renamed(p, {"--dampings": "--damping"})


def build_parser(*, defaults: bool = True) -> argparse.ArgumentParser:
    """The argument parser of the ``fisherlab`` command (``defaults=False``: options not given stay unset)."""
    parser = argparse.ArgumentParser(prog="fisherlab", description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt: dict[str, Any] = {"formatter_class": HelpFormatter}
    p = sub.add_parser(
        "fidelity", help="the main job: fidelity of update rules to exact NGD, with a report", **fmt,
        description=paragraph(
            "The main job. Measures how closely each update rule tracks exact natural gradient descent (NGD) at the "
            "initial parameters (fidelity.nc) and along a training run (trajectory.nc), the preconditioned geometry "
            "of each structure (geometry.nc) and the Fisher spectra (spectrum.nc); then draws the figures and "
            "writes report.html into --out. A rerun with the same options resumes: finished parts are kept."),
        epilog=f"{OWN_MODEL_HELP}\n\n{OPTIMIZER_HELP}\n\n{TORCHRUN_HELP}\n\n{CONFIG_HELP}")
    add_fidelity_options(p)
    p.set_defaults(func=cmd_fidelity, command_parser=p)
    p = sub.add_parser(
        "spectra", help="Fisher spectra and condition numbers (or, with --slq, spectral densities)", **fmt,
        description=paragraph(
            "Eigenvalues, traces and condition numbers of the dense, block and diagonal Fishers of each kind "
            "(spectrum.nc), or with --slq the spectral density of the implicit Fisher by stochastic Lanczos "
            "quadrature, for models whose P×P Fisher does not fit (spectral_density.nc)."),
        epilog=f"{OWN_MODEL_HELP}\n\n{CONFIG_HELP}")
    add_spectra_options(p)
    p.set_defaults(func=cmd_spectra, command_parser=p)
    p = sub.add_parser("report", help="rebuild the HTML report of an output folder from its Datasets", **fmt,
                       description=paragraph("Draw the figures of every Dataset in FOLDER and write "
                                                   "FOLDER/report.html."))
    p.add_argument("folder", metavar="FOLDER", help="output folder of an earlier run")
    p.set_defaults(func=cmd_report, command_parser=p)
    if not defaults:
        for p in (parser, *sub.choices.values()):
            for action in p._actions:
                action.default = argparse.SUPPRESS
                if isinstance(action, RenamedOption):
                    action.quiet = True  # said once, by the parser with defaults
    return parser


# ------------------------------------------------------------------------------------------ configuration
def load_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a TOML or YAML file, keys normalised to argparse destinations (``-`` → ``_``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"configuration file not found: {path}")
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise InputError(f"configuration file must be .toml, .yaml or .yml; got {path.name}")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10: the same parser as the tomli package
                import tomli as tomllib

            raw = tomllib.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text) or {}
    except Exception as exc:  # tomllib.TOMLDecodeError, yaml.YAMLError
        raise InputError(f"{path}: not a readable configuration file ({exc})") from None
    if not isinstance(raw, dict):
        raise InputError(f"configuration file {path} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in raw.items()}


def convert_config_value(action: argparse.Action, value: Any, where: str) -> Any:
    """A configuration-file value through ``action``'s nargs, type and choices, as argparse treats a flag.

    Scalars are converted from their text (``seed = "1"`` is 1); an on/off option (``--overwrite``) takes only
    ``true`` or ``false``.

    Raises:
        InputError: Naming ``where`` (the file and key) and what the option expects.
    """
    option = action.option_strings[-1]
    if action.nargs == 0:  # store_true / store_false
        if not isinstance(value, bool):
            raise InputError(f"{where}: {option} is on or off: give true or false, not {value!r}")
        return value if action.const is True else not value
    many = action.nargs in ("+", "*")
    items = value if isinstance(value, list) and many else [value]
    if isinstance(value, list) and not many:
        raise InputError(f"{where}: {option} takes one value, not a list")
    if not items and action.nargs == "+":
        raise InputError(f"{where}: {option} needs at least one value")
    out = []
    for item in items:
        if isinstance(item, (list, dict, bool)):
            shown = str(item).lower() if isinstance(item, bool) else f"the nested {type(item).__name__} {item!r}"
            raise InputError(f"{where}: {option} takes {'values' if many else 'a value'} as on the command line, "
                             f"not {shown}")
        text = str(item)
        if action.type is not None:
            try:
                converted = action.type(text)  # type: ignore[operator]
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                name = getattr(action.type, "__name__", "")
                raise InputError(f"{where}: invalid {name} value {item!r} for {option}") from None
        else:
            converted = text
        if action.choices is not None and converted not in action.choices:
            raise InputError(f"{where}: {option} got {item!r}; valid: {', '.join(map(str, action.choices))}")
        out.append(converted)
    return out if many else out[0]


def apply_config_file(args: argparse.Namespace, argv: Sequence[str]) -> set[str]:
    """Fill ``args`` from its ``--config`` file: file values replace defaults, options given in ``argv`` win.

    Returns the destinations (field names) the file set.
    """
    path = Path(args.config)
    values = load_config_file(path)
    actions = {opt[2:].replace("-", "_"): a for a in args.command_parser._actions for opt in a.option_strings
               if opt.startswith("--") and opt not in ("--help", "--config")}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        valid = sorted(k for k, a in actions.items() if not isinstance(a, RenamedOption))
        raise InputError(f"unknown option(s) {unknown} in {path}; valid: {valid}")
    given = given_options(argv)
    done = set()
    for key, value in values.items():
        action = actions[key]
        if isinstance(action, RenamedOption):
            print(f"fisherlab: {path}: {key} is deprecated; use {action.new[2:]}", file=sys.stderr)
        if action.dest in given:
            continue
        if isinstance(action, OptimizerArgsOption):  # a list of key=value lists, one per optimizer (or one list)
            setattr(args, action.dest, optimizer_args_value(value, f"{path}: {key}"))
        else:
            setattr(args, action.dest, convert_config_value(action, value, f"{path}: {key}"))
        done.add(action.dest)
    return done


def given_options(argv: Sequence[str]) -> set[str]:
    """The destinations of the options written in ``argv``."""
    return set(vars(build_parser(defaults=False).parse_args(argv)))


def apply_model_defaults(args: argparse.Namespace, given: set[str]) -> None:
    """Give the options not in ``given`` the defaults of the chosen built-in model (:data:`study.MODEL_DEFAULTS`).

    (The GPT takes data sort-lm, 32 sequences and a short trajectory unless told otherwise.)
    """
    cls = {"fidelity": StudyConfig, "spectra": SpectraConfig}.get(args.command)
    if cls is None:
        return
    for name, value in model_defaults(cls, args.model).items():
        if name not in given:
            setattr(args, name, copy.deepcopy(value))


def optimizer_args_value(value: Any, where: str) -> list[Any]:
    """``optimizer-args`` of a configuration file: ``["lr=1e-3"]`` (one optimizer) or ``[["lr=1e-3"], []]``."""
    lists = value if isinstance(value, list) and value and all(isinstance(v, list) for v in value) else [value]
    for items in lists:
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise InputError(f"{where}: --optimizer-args takes a list of \"key=value\" strings (or one such list "
                             f"per optimizer), not {value!r}")
    return lists


def make_config(cls: type[RunConfig], args: argparse.Namespace) -> Any:
    """The validated configuration ``cls`` of the parsed ``args`` (every option is a field)."""
    import dataclasses

    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def describe(exc: FisherlabError, args: argparse.Namespace | None) -> str:
    """The message of ``exc``, naming the command-line option when it is about a configuration field."""
    name = getattr(exc, "field", None)
    parser = getattr(args, "command_parser", None)
    if name and parser is not None:
        for action in parser._actions:
            if action.dest == name and action.option_strings:
                return f"{action.option_strings[-1]}: {exc.detail}"  # type: ignore[attr-defined]
    return str(exc)


def output_folder(args: argparse.Namespace) -> Path:
    """``--out`` as a path that is not an existing file."""
    out = Path(args.out)
    try:
        is_file = out.exists() and not out.is_dir()
    except OSError as err:  # e.g. a name longer than the file system allows
        raise InputError(f"--out: {str(out)[:80]}...: {err.strerror or err}") from None
    if is_file:
        raise InputError(f"--out: {out} is a file, not a folder")
    return out


# ------------------------------------------------------------------------------------------ subcommands
def model_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def cmd_spectra(args: argparse.Namespace) -> int:
    """Compute and save Fisher spectra (or, with ``--slq``, their SLQ density); print a summary table."""
    from fisherlab.distributed import launch_environment

    if launch_environment() is not None:
        raise InputError("fisherlab spectra does not yet run under torchrun (every rank would write); run it in "
                         "one process, or use the spectrum part of fisherlab fidelity")
    cfg: SpectraConfig = make_config(SpectraConfig, args)
    out = output_folder(args)
    from fisherlab.report import build_report, print_table, table_spectral_density, table_spectrum
    from fisherlab.results import guard_output_folder, save_dataset
    from fisherlab.study import likelihood_for, load_model_and_data

    model, data = load_model_and_data(cfg)  # a wrong model or data is refused before the folder is claimed
    config = cfg.to_dict()
    guard_output_folder(out, config, overwrite=args.overwrite)
    progress = False if args.no_progress else None
    common = {"seed": cfg.seed, "dtype": cfg.torch_dtype(), "device": cfg.device, "progress": progress,
              "config": config}
    if cfg.slq:
        from fisherlab.density import spectral_density

        ds = spectral_density(model, data, likelihood_for(data), kinds=cfg.kinds, num_probes=cfg.probes,
                              num_steps=cfg.lanczos_steps, **common)
        path = save_dataset(ds, out / "spectral_density.nc")
        print_table(*table_spectral_density(ds))
    else:
        from fisherlab.spectra import fisher_spectra

        ds = fisher_spectra(model, data, likelihood_for(data), kinds=cfg.kinds, damping=cfg.damping, **common)
        path = save_dataset(ds, out / "spectrum.nc")
        print_table(*table_spectrum(ds))
    print(f"\nP = {model_parameters(model)} parameters, N = {int(data.n_train)} samples; wrote {path}")
    print(f"report: {build_report(out)}")
    return 0


def cmd_fidelity(args: argparse.Namespace) -> int:
    """Run the fidelity study (the main job) and write its Datasets, figures and report.

    Under torchrun every rank computes (:func:`fisherlab.study.run_study` shards the data) and rank 0 alone
    claims the folder, writes and prints. The report is drawn in a process of its own (:func:`report_process`),
    started first, so that its imports run beside this process's own (torch's), on the core they leave idle.
    """
    drawer = report_process()
    try:
        cfg: StudyConfig = make_config(StudyConfig, args)
        out = output_folder(args)
        from fisherlab.distributed import launched

        with launched(args.backend, cfg.device, args.timeout) as env:
            lead = env is None or env.rank == 0
            return _fidelity(cfg, out, args, lead=lead, drawer=drawer if lead else None)
    except KeyboardInterrupt:
        if drawer is not None:
            drawer.interrupt()
        raise
    finally:
        if drawer is not None:
            drawer.close()


def _fidelity(cfg: StudyConfig, out: Path, args: argparse.Namespace, *, lead: bool,
              drawer: ReportProcess | None) -> int:
    """The body of :func:`cmd_fidelity` on one rank (``lead``: rank 0, or the only process).

    Rank 0 has the report drawn by ``drawer`` while the study computes, or, without one or where it fails, draws
    it itself when the study is done; either way from the saved Datasets only.
    """
    from fisherlab.distributed import active_group, on_lead
    from fisherlab.results import guard_output_folder
    from fisherlab.study import load_model_and_data, run_study

    model_and_data = load_model_and_data(cfg)  # a wrong model or data is refused before the folder is claimed
    if on_lead(lambda: guard_output_folder(out, cfg.to_dict(), overwrite=args.overwrite), active_group()) and lead:
        print(f"{out} holds this configuration: resuming (finished parts are kept)")
    start = time.perf_counter()
    if drawer is not None:
        # the report's λ (report.study_damping of the finished study): the trajectory's, else the fidelity part's
        # middle damping (both cfg.trajectory_damping), else none
        drawer.open(out, cfg.trajectory_damping if {"trajectory", "fidelity"} & set(cfg.parts) else None)
    results = run_study(cfg, out, progress=False if args.no_progress or not lead else None,
                        model_and_data=model_and_data, saved=None if drawer is None else drawer.saved)
    if not lead:
        return 0
    report_start, report_cpu = time.perf_counter(), time.process_time()
    reply = None if drawer is None else drawer.finish()
    if reply is not None:
        print(reply["console"], end="")
        report = Path(reply["report"])
        print(f"\n[report] done in {time.perf_counter() - report_start:.1f} s after the parts ({reply['cpu']:.1f} "
              "CPU-s in a process of its own: each part's figures drawn when the part was saved, the page at the end; "
              "with the import of matplotlib and seaborn)")
    else:
        if drawer is not None:
            print(f"fisherlab: the report process failed ({drawer.error}); drawing the report here", file=sys.stderr)
        from fisherlab.report import build_report, study_console  # matplotlib's and seaborn's import

        print(study_console(results), end="")
        report = build_report(out)  # title and headline from the saved Datasets: `fisherlab report` rebuilds it
        print(f"\n[report] done in {time.perf_counter() - report_start:.1f} s ({time.process_time() - report_cpu:.1f} "
              "CPU-s, all threads; with the import of matplotlib and seaborn)")
    print(f"finished in {time.perf_counter() - start:.1f} s; report: {report}")
    return 0


#: How the report process finds this fisherlab (argv[1]: the folder holding it): the folder goes first on its
#: ``sys.path`` only where ``fisherlab`` would resolve to none or another copy, so that an installed package's
#: folder (site-packages) does not come before the standard library.
FIND_PACKAGE = ("import importlib.util, os, sys\n"
                "spec = importlib.util.find_spec('fisherlab')\n"
                "if spec is None or spec.origin is None or os.path.realpath(spec.origin) != "
                "os.path.join(sys.argv[1], 'fisherlab', '__init__.py'):\n"
                "    sys.path.insert(0, sys.argv[1])\n")

#: What the report process runs (``python -c``; argv[1]: the folder holding this fisherlab package). It ends once
#: :func:`fisherlab.report.serve` returns, after ``gc.freeze``: its last collection no longer visits every object.
REPORT_PROCESS = FIND_PACKAGE + ("import gc; from fisherlab.report import serve; status = serve(); gc.freeze(); "
                                  "sys.exit(status)")


class ReportProcess:
    """The report of ``fisherlab fidelity`` drawn in a process of its own while the study computes.

    The process (:func:`fisherlab.report.serve`) starts at once and imports matplotlib and seaborn while the
    command imports torch, one process per core. It learns the folder from :meth:`open` once the study may write
    there; :meth:`saved` tells it each Dataset saved, whose figures it draws at once, in the core time the study
    leaves; :meth:`finish` has it write the page, so that only the last part's figures and the page come after the
    study. (Its import beside the study's first part, which runs on two threads, would cost more than the import:
    the default fidelity part took 4.0 s instead of 3.1 s beside it on 2 cores, AMD EPYC, load 1.7–1.9.) It only
    reads the saved Datasets, and when it fails (or cannot start), its error is kept in :attr:`error` and
    :meth:`finish` returns None (the command then draws the report itself); a process not asked to finish is
    killed by :meth:`close` (after a Ctrl-C once :meth:`interrupt` gave it time to end as a Ctrl-C ends it).
    Thread-safe: the study's parts report their saves from two threads.
    """

    def __init__(self) -> None:
        import subprocess
        import tempfile
        import threading

        self.error = ""
        self._lock = threading.Lock()
        self._finished = False
        self._communicated = False  # finish read its output to the end (and closed its pipes)
        self._proc: subprocess.Popen[str] | None = None
        self._errors: IO[bytes] | None = None
        package = Path(__file__).resolve().parents[1]  # the child imports this fisherlab (FIND_PACKAGE)
        if not sys.executable:  # an embedded interpreter that cannot say which Python it is
            self.error = "cannot start it: sys.executable is empty"
            return
        try:
            self._errors = tempfile.TemporaryFile()  # its standard error (a file: it never blocks on a full pipe)
            self._proc = subprocess.Popen([sys.executable, "-c", REPORT_PROCESS, str(package)],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._errors,
                                          text=True, encoding="utf-8")
        except OSError as exc:
            self.error = f"cannot start it: {exc}"

    def open(self, folder: Path, damping: float | None) -> None:
        """The study writes into ``folder``.

        ``damping``: the report's λ the finished study will have (:func:`fisherlab.report.study_damping`); a
        figure drawn at another is drawn again for the page.
        """
        self._send({"folder": str(folder), "damping": damping})

    def _send(self, request: dict[str, Any]) -> None:
        import json

        with self._lock:
            if self._proc is None or self._proc.stdin is None:
                return
            try:
                self._proc.stdin.write(json.dumps(request) + "\n")
                self._proc.stdin.flush()
            except (OSError, ValueError):  # it ended (an error: finish says so) or its input is closed
                pass

    def saved(self, path: Path) -> None:
        """Dataset ``path`` of the folder is saved: its figures can be drawn."""
        self._send({"saved": Path(path).name})

    def finish(self) -> dict[str, Any] | None:
        """Write the page; the process's reply (:func:`fisherlab.report.serve`), or None if it failed."""
        import json

        self._send({"finish": True})
        self._finished = True
        if self._proc is None:
            return None
        out, _ = self._proc.communicate()
        self._communicated = True
        lines = out.strip().splitlines()
        if self._proc.returncode == 0 and lines:
            try:
                reply = json.loads(lines[-1])
            except json.JSONDecodeError:
                reply = None
            if isinstance(reply, dict) and {"report", "console", "cpu"} <= reply.keys():
                return reply
            self.error = f"its last line of output is not its reply: {lines[-1][:120]!r}"
            return None
        self._errors.seek(0)
        tail = self._errors.read().decode(errors="replace").strip().splitlines()
        self.error = tail[-1] if tail else f"exit status {self._proc.returncode}"
        return None

    def interrupt(self) -> None:
        """The command was interrupted: the process ends as a Ctrl-C ends it, not killed by :meth:`close` mid-write.

        A terminal's Ctrl-C reached it too (its process group): it is given 0.5 s to end; still running (SIGINT
        sent to the command alone), it is sent one. Either way it may take up to 5 s more, the rest of the figure it
        is drawing (a figure is written or its temporary removed, :func:`fisherlab.report.write_atomically`); then
        :meth:`close` kills it.
        """
        import signal
        import subprocess

        if self._proc is None:
            return
        for wait, then in ((0.5, signal.SIGINT), (5.0, None)):
            try:
                self._proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                if then is not None:
                    self._proc.send_signal(then)

    def close(self) -> None:
        """End the process, and close its pipes and its standard error's file.

        After :meth:`finish` it has ended; else it is killed if still running (a refused option, an error).
        """
        if self._proc is not None:
            if not self._finished and self._proc.poll() is None:
                self._proc.kill()
            if not self._communicated:
                self._proc.communicate()
        if self._errors is not None:
            self._errors.close()


def report_process() -> ReportProcess | None:
    """The :class:`ReportProcess` of a ``fisherlab fidelity`` run, or None: on a torchrun rank other than 0.

    Rank 0 (``RANK`` 0, or unset) alone draws the report.
    """
    return ReportProcess() if os.environ.get("RANK", "0") in ("", "0") else None


def cmd_report(args: argparse.Namespace) -> int:
    """Rebuild the HTML report of a folder from its saved Datasets."""
    from fisherlab.report import build_report

    print(f"wrote {build_report(args.folder)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fisherlab`` command; returns the exit status (2: bad input, 130: interrupted).

    Run as the program (``argv`` None: the arguments of ``sys.argv``), it moves every object out of the garbage
    collector's reach before it returns (``gc.freeze``): the interpreter's collection at exit then no longer
    visits them (after the main job, 0.2 s instead of 0.8–1.9 s on 2 cores of an AMD EPYC).
    """
    status = run_command(list(sys.argv[1:] if argv is None else argv))
    if argv is None:
        import gc

        gc.freeze()
    return status


def run_command(argv: list[str]) -> int:
    """The command ``fisherlab ARGV``; returns the exit status (:func:`main`)."""
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():  # deprecated spellings (a rule name, ...) are said on the command line
            warnings.filterwarnings("default", category=DeprecationWarning, module=r"fisherlab(\.|$)")
            given = given_options(argv)
            if getattr(args, "config", None):
                given |= apply_config_file(args, argv)
            apply_model_defaults(args, given)
            return int(args.func(args) or 0)
    except FisherlabError as exc:
        named = "" if isinstance(exc, InputError) else f"{type(exc).__name__}: "
        print(f"fisherlab: error: {named}{describe(exc, args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fisherlab: interrupted; finished results are kept in the output folder", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
