"""The ``fisherlab`` command line.

Subcommands:

* ``fisherlab spectra``  — Fisher spectra and condition numbers of a reference model on embedded data (``--slq``:
  the stochastic-Lanczos spectral density instead, for models too large for dense spectra).
* ``fisherlab fidelity`` — the main job: how closely update rules track exact NGD, with figures and an HTML
  report (see :mod:`fisherlab.report`).
* ``fisherlab report FOLDER`` — rebuild the HTML report of a folder from its saved Datasets.

Every option can also come from a configuration file (``--config run.toml`` or ``.yaml``) whose keys are the
long option names with ``-`` or ``_``; options given on the command line win.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fisherlab.errors import FisherlabError, InputError


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a TOML or YAML file, keys normalised to argparse destinations (``-`` → ``_``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"configuration file not found: {path}")
    text = path.read_text()
    if path.suffix == ".toml":
        import tomllib

        raw = tomllib.loads(text)
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        raw = yaml.safe_load(text) or {}
    else:
        raise InputError(f"configuration file must be .toml, .yaml or .yml; got {path.name}")
    if not isinstance(raw, dict):
        raise InputError(f"configuration file {path} must hold a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in raw.items()}


def add_common(p: argparse.ArgumentParser, *, out: str) -> None:
    """Options shared by the study subcommands: model, data, seed, device, dtype, output folder, config file."""
    from fisherlab.data import DATASETS
    from fisherlab.models import MODELS

    p.add_argument("--config", help="TOML or YAML file with option values (command line wins)")
    p.add_argument("--model", default="mlp", choices=MODELS, help="reference network (default: mlp 64-32-32-10)")
    p.add_argument("--data", default="digits", choices=[d for d in DATASETS if d not in ("mnist", "cifar10")],
                   help="embedded data set (default: scikit-learn digits)")
    p.add_argument("--n-samples", type=int, default=None, help="use the first N training samples (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of data split, initialisation and sampling")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--out", default=out, help=f"output folder (default: {out})")
    p.add_argument("--overwrite", action="store_true",
                   help="replace results in --out even if they come from a different configuration")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Merge a configuration file under the command line: file values replace defaults, explicit flags win."""
    if not getattr(args, "config", None):
        return args
    values = load_config_file(args.config)
    known = {a.dest for a in parser._subparsers._group_actions[0].choices[args.command]._actions}  # type: ignore
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"unknown option(s) {unknown} in {args.config}; valid: {sorted(known - {'help'})}")
    explicit = {a.split("=")[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}
    for key, value in values.items():
        if key not in explicit:
            setattr(args, key, value)
    return args


def cmd_spectra(args: argparse.Namespace) -> int:
    """Compute and save Fisher spectra (or, with ``--slq``, their SLQ density); print a summary table."""
    from fisherlab.report import guard_output_folder, print_table, table_spectral_density
    from fisherlab.results import save_dataset
    from fisherlab.spectra import fisher_spectra
    from fisherlab.study import DTYPES, likelihood_for, load_model_and_data

    model, data = load_model_and_data(args.model, args.data, n_samples=args.n_samples, seed=args.seed,
                                      device=args.device, dtype=DTYPES[args.dtype])
    config = {"command": "spectra", "model": args.model, "data": args.data, "n_samples": args.n_samples,
              "kinds": args.kinds, "dampings": args.dampings,
              **({"slq": True, "probes": args.probes, "lanczos_steps": args.lanczos_steps} if args.slq else {})}
    out = Path(args.out)
    guard_output_folder(out, config, overwrite=args.overwrite)
    if args.slq:
        from fisherlab.density import spectral_density

        ds = spectral_density(model, data, likelihood_for(data), kinds=args.kinds, num_probes=args.probes,
                              num_steps=args.lanczos_steps, seed=args.seed, dtype=DTYPES[args.dtype],
                              device=args.device, progress=False if args.no_progress else None, config=config)
        path = save_dataset(ds, out / "spectral_density.nc")
        print_table(*table_spectral_density(ds))
        print(f"\nP = {model_parameters(model)} parameters, N = {int(data.n_train)} samples; wrote {path}")
        return 0
    ds = fisher_spectra(model, data, likelihood_for(data), kinds=args.kinds, dampings=args.dampings,
                        seed=args.seed, dtype=DTYPES[args.dtype], device=args.device,
                        progress=False if args.no_progress else None, config=config)
    path = save_dataset(ds, out / "spectrum.nc")
    rows = []
    for kind in ds.fisher_kind.values:
        for s in ds.structure.values:
            e = ds.eigenvalue.sel(fisher_kind=kind, structure=s).values
            rows.append([kind, s, f"{e[-1]:.3e}", f"{ds.trace.sel(fisher_kind=kind, structure=s).item():.3e}",
                         *[f"{c:.3g}" for c in ds.condition_number.sel(fisher_kind=kind, structure=s).values],
                         f"{ds.rel_frobenius_to_true.sel(fisher_kind=kind, structure=s).item():.3f}"])
    print_table(["fisher", "structure", "λ_max", "trace", *[f"κ(λ={d:g})" for d in args.dampings],
                 "‖F−F_true‖/‖F_true‖"], rows)
    print(f"\nP = {model_parameters(model)} parameters, N = "
          f"{int(data.n_train)} samples; wrote {path}")
    return 0


def model_parameters(model: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def cmd_fidelity(args: argparse.Namespace) -> int:
    """Run the fidelity study (the main job) and write its Datasets, figures and report."""
    from fisherlab.report import build_report, guard_output_folder, print_table
    from fisherlab.study import StudyConfig, headline, run_study

    names = {f.name for f in dataclasses.fields(StudyConfig)}
    cfg = StudyConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None})
    out = Path(args.out)
    if guard_output_folder(out, cfg.to_dict(), overwrite=args.overwrite):
        print(f"{out} holds this configuration: resuming (finished parts are kept)")
    start = time.perf_counter()
    results = run_study(cfg, out, progress=False if args.no_progress else None)
    if "fidelity" in results:
        from fisherlab.report import table_fidelity

        header, rows = table_fidelity(results["fidelity"])
        print()
        print_table(header, rows)
    summary = headline(results)
    print("\n" + summary)
    report = build_report(out, title=f"fisherlab fidelity study: {cfg.model} on {cfg.data}", summary=summary)
    print(f"\nfinished in {time.perf_counter() - start:.0f} s; report: {report}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Rebuild the HTML report of a folder from its saved Datasets."""
    from fisherlab.report import build_report

    print(f"wrote {build_report(args.folder)}")
    return 0


def add_fidelity_options(p: argparse.ArgumentParser) -> None:
    """Options of ``fisherlab fidelity`` (defaults: :class:`fisherlab.study.StudyConfig`)."""
    from fisherlab.fidelity import RULES
    from fisherlab.study import PARTS, StudyConfig

    d = StudyConfig.__dataclass_fields__
    add_common(p, out="results/fidelity")
    p.set_defaults(n_samples=d["n_samples"].default)
    rules = f"rules (valid: {', '.join(sorted(RULES))})"
    p.add_argument("--rules", nargs="+", default=None, help=f"update {rules}; default: all main ones")
    p.add_argument("--dampings", nargs="+", type=float, default=None, help="damping values λ")
    p.add_argument("--lr", type=float, default=None, help="learning rate of measured steps")
    p.add_argument("--train-method", default=None, help="method of the training trajectory (default sngd-kfac)")
    p.add_argument("--train-lr", type=float, default=None, help="learning rate of the trajectory")
    p.add_argument("--steps", type=int, default=None, help="training steps of the trajectory")
    p.add_argument("--every", type=int, default=None, help="measure fidelity every N steps")
    p.add_argument("--refresh-every", type=int, default=None, help="refresh interval of reconstructed networks")
    p.add_argument("--trajectory-rules", nargs="+", default=None, help="rules measured along the trajectory")
    p.add_argument("--geometry-structures", nargs="+", default=None, help="structures G of the geometry part")
    p.add_argument("--geometry-dampings", nargs="+", type=float, default=None, help="λ values of the geometry part")
    p.add_argument("--spectrum-kinds", nargs="+", default=None, help="Fisher kinds of the spectrum part")
    p.add_argument("--parts", nargs="+", default=None, choices=PARTS, help="parts of the study to run")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fisherlab`` command."""
    parser = argparse.ArgumentParser(prog="fisherlab", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("spectra", help="Fisher spectra and condition numbers on embedded data")
    add_common(p, out="results/spectra")
    p.add_argument("--kinds", nargs="+", default=["true", "mc", "empirical"],
                   help="Fisher kinds: true mc empirical ggn")
    p.add_argument("--dampings", nargs="+", type=float, default=[0.0, 1e-4, 1e-3, 1e-2, 1e-1])
    p.add_argument("--slq", action="store_true",
                   help="spectral density by stochastic Lanczos quadrature on the implicit Fisher, for models whose "
                        "P×P Fisher does not fit (writes spectral_density.nc)")
    p.add_argument("--probes", type=int, default=10, help="SLQ probes (with --slq)")
    p.add_argument("--lanczos-steps", type=int, default=64, help="Lanczos steps per probe (with --slq)")
    p.set_defaults(func=cmd_spectra)
    p = sub.add_parser("fidelity", help="the main job: fidelity of update rules to exact NGD, with a report")
    add_fidelity_options(p)
    p.set_defaults(func=cmd_fidelity)
    p = sub.add_parser("report", help="rebuild the HTML report of an output folder from its Datasets")
    p.add_argument("folder", help="output folder of an earlier run")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fisherlab`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args = resolve(args, parser, argv)
        return int(args.func(args) or 0)
    except FisherlabError as exc:
        print(f"fisherlab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fisherlab: interrupted; finished results are kept in the output folder", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
