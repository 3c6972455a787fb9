"""Spectra and condition numbers of Fisher matrices, as an xarray Dataset (``fisherlab_kind = "spectrum"``).

For each Fisher kind (true, Monte-Carlo, empirical, GGN) and structure (dense, block by layer, diagonal), the
full spectrum of F, its trace, its condition number κ(F + λI) at several dampings λ, the per-layer spectra, and
the relative Frobenius distance of each to the dense true Fisher (how far an approximation is from F).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import xarray as xr
from torch import nn

from fisherlab import results
from fisherlab.checks import check_dampings, parse_enum, renamed
from fisherlab.engine import FisherEngine
from fisherlab.errors import InputError
from fisherlab.progress import bar as progress_bar
from fisherlab.structures import BlockDiagonalFisher, FisherMatrix
from fisherlab.structures import build as build_structure
from fisherlab.vocabulary import FisherKind

if TYPE_CHECKING:
    from fisherlab.fidelity.rules import RuleContext

#: Structures whose full spectrum is affordable whenever the dense Fisher is.
SPECTRUM_STRUCTURES = ("dense", "block", "diag")


def _condition(ev: np.ndarray, damping: float) -> float:
    lo = ev[0] + damping
    return float((ev[-1] + damping) / lo) if lo > 0 else float("inf")


def fisher_spectra(
    model: nn.Module,
    data: Any,
    likelihood: str = "categorical",
    *,
    kinds: Sequence[str] = ("true", "mc", "empirical"),
    structures: Sequence[str] = SPECTRUM_STRUCTURES,
    damping: float | Sequence[float] = (0.0, 1e-4, 1e-3, 1e-2, 1e-1),
    mc_samples: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    memory_budget: int | None = None,
    progress: bool | None = None,
    config: dict | None = None,
    context: RuleContext | None = None,
    **deprecated: Any,
) -> xr.Dataset:
    """Spectra of the requested Fisher kinds and structures of ``model`` on ``data``.

    Args:
        model: Any ``nn.Module`` (eval mode if it has batch-norm or dropout).
        data: ``(X, y)``, a SplitData (training split) or a DataLoader.
        likelihood: Likelihood name (see :mod:`fisherlab.likelihoods`).
        kinds: Fisher kinds; ``"true"`` is always computed (it is the reference of ``rel_frobenius_to_true``).
        structures: Any of ``"dense"``, ``"block"`` (per layer), ``"diag"`` (``structure_names=`` is the
            deprecated spelling).
        damping: λ values for κ(F + λI), one or several (``dampings=`` is the deprecated spelling).
        mc_samples: Labels per input for the Monte-Carlo Fisher.
        seed: Seed of the Monte-Carlo labels.
        dtype: Compute dtype (float64 recommended: the small eigenvalues are the interesting ones).
        device: Compute device.
        memory_budget: Bytes a dense object may take (default: half the available memory).
        progress: Progress bars (``None``: only on a terminal).
        config: Extra configuration recorded in the provenance attrs.
        context: A :class:`~fisherlab.fidelity.rules.RuleContext` of ``model`` on ``data`` with these settings,
            already used elsewhere (e.g. by :func:`~fisherlab.evaluate_fidelity`): its engines, dense Fishers and
            their eigenvalues are used instead of computing them again (refused, with an InputError, when its data,
            parameters or settings differ). Without one, a block structure is still read off the dense matrix
            of the same kind when that was built first.
        **deprecated: The old spellings named above.

    Returns:
        Dataset with dims ``kind``, ``structure``, ``eig`` (P, ascending), ``damping``, ``layer`` and
        ``layer_eig`` (largest layer size; shorter layer spectra padded with NaN), variables ``eigenvalue``,
        ``trace``, ``condition_number``, ``layer_eigenvalue``, ``layer_condition_number`` and
        ``rel_frobenius_to_true``.
    """
    structures = renamed(deprecated, "structure_names", "structures", structures, SPECTRUM_STRUCTURES,
                         "fisher_spectra")
    damping = renamed(deprecated, "dampings", "damping", damping, (0.0, 1e-4, 1e-3, 1e-2, 1e-1), "fisher_spectra")
    if deprecated:
        raise InputError(f"fisher_spectra got unexpected keyword argument(s) {sorted(deprecated)}")
    dampings = check_dampings(damping)
    kinds = list(dict.fromkeys(["true", *[parse_enum(FisherKind, k, "Fisher kind").value for k in kinds]]))
    structure_names = list(structures)
    for s in structure_names:
        if s not in SPECTRUM_STRUCTURES:
            raise InputError(f"spectra need a structure in {SPECTRUM_STRUCTURES}; got {s!r}")
    eigs: dict[tuple[str, str], np.ndarray] = {}
    rel: dict[tuple[str, str], float] = {}
    layer_eigs: dict[str, dict[str, np.ndarray]] = {}
    reference: torch.Tensor | None = None
    spec = None
    if context is not None:
        context.check_shares(model, data, likelihood=likelihood, mc_samples=mc_samples, seed=seed, dtype=dtype,
                             device=device, memory_budget=memory_budget)
    bar = progress_bar(total=len(kinds) * len(structure_names), desc="Fisher spectra", progress=progress)
    for kind in kinds:
        shared = context is not None and context.exact_fisher(kind).structure == "dense"
        if shared:
            engine = context.engine(kind)
        else:
            engine = FisherEngine(model, data, likelihood, kind=kind, mc_samples=mc_samples, seed=seed, dtype=dtype,
                                  device=device, memory_budget=memory_budget, progress=progress)
        spec = engine.spec
        built: FisherMatrix | None = context.exact_fisher(kind) if shared else None  # the kind's dense Fisher
        for structure in structure_names:
            bar.set_postfix_str(f"{kind}/{structure}")
            if structure == "dense" and built is not None:
                F: FisherMatrix = built
            elif structure == "block" and built is not None:
                F = BlockDiagonalFisher.from_dense(built)
            else:
                F = build_structure(structure, engine)
            if structure == "dense":
                built = F
            if structure == "block" and isinstance(F, BlockDiagonalFisher):  # each block's eigvalsh once
                blocks = context.layer_eigenvalues(kind) if shared else F.block_eigvalsh()
                layer_eigs[kind] = {k: v.cpu().double().numpy() for k, v in blocks.items()}
                ev = torch.sort(torch.cat(list(blocks.values()))).values  # = F.eigvalsh()
            else:
                ev = context.eigenvalues(kind) if shared and structure == "dense" else F.eigvalsh()
            eigs[kind, structure] = ev.cpu().double().numpy()
            dense = F.to_dense()
            if kind == "true" and structure == "dense":
                reference = dense
            rel[kind, structure] = float(torch.linalg.norm(dense - reference) / torch.linalg.norm(reference))
            bar.update(1)
    bar.close()
    assert spec is not None
    P = spec.dim
    layers = list(spec.layers())
    n_layer_eig = max(sum(spec.numels[spec.names.index(n)] for n in members) for members in spec.layers().values())
    ev = np.full((len(kinds), len(structure_names), P), np.nan)
    cond = np.full((len(kinds), len(structure_names), len(dampings)), np.nan)
    rel_arr = np.full((len(kinds), len(structure_names)), np.nan)
    lev = np.full((len(kinds), len(layers), n_layer_eig), np.nan)
    lcond = np.full((len(kinds), len(layers), len(dampings)), np.nan)
    for i, kind in enumerate(kinds):
        for j, structure in enumerate(structure_names):
            ev[i, j] = eigs[kind, structure]
            cond[i, j] = [_condition(ev[i, j], d) for d in dampings]
            rel_arr[i, j] = rel[kind, structure]
        for li, layer in enumerate(layers):
            if kind in layer_eigs:
                e = layer_eigs[kind][layer]
                lev[i, li, : len(e)] = e
                lcond[i, li] = [_condition(e, d) for d in dampings]
    ds = results.new_dataset(
        "spectrum",
        {
            "eigenvalue": (("kind", "structure", "eig"), ev),
            "trace": (("kind", "structure"), ev.sum(-1)),
            "condition_number": (("kind", "structure", "damping"), cond),
            "rel_frobenius_to_true": (("kind", "structure"), rel_arr),
            "layer_eigenvalue": (("kind", "layer", "layer_eig"), lev),
            "layer_condition_number": (("kind", "layer", "damping"), lcond),
        },
        {
            "kind": kinds,
            "structure": list(structure_names),
            "eig": np.arange(P),
            "damping": np.asarray(dampings, dtype=float),
            "layer": layers,
            "layer_eig": np.arange(n_layer_eig),
        },
        config={"likelihood": likelihood, "kinds": kinds, "structures": list(structure_names),
                "dampings": list(dampings), "mc_samples": mc_samples, "num_samples": engine.num_samples,
                "num_params": P, **(config or {})},
        seed=seed, device=engine.device, dtype=dtype,
    )
    return results.annotate(ds, {
        "eigenvalue": ("eigenvalues of F, ascending (block: union of block spectra; diag: sorted diagonal)",
                       *results.NATS),
        "trace": ("trace of F", *results.NATS),
        "condition_number": ("condition number of F + λI", "1"),
        "rel_frobenius_to_true": ("‖F − F_true‖_F / ‖F_true‖_F (dense true Fisher)", "1"),
        "layer_eigenvalue": ("eigenvalues of the layer block of F, ascending (NaN-padded)", *results.NATS),
        "layer_condition_number": ("condition number of the layer block of F + λI", "1"),
    })
