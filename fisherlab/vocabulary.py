"""The vocabulary: every closed option set of fisherlab as a ``str`` Enum, and the one table of structures.

The same words name the same concepts in the docs (``docs/method.md``), in function arguments, on the command
line and in the coordinates of results Datasets. Every enum member *is* its string (``FisherKind.TRUE == "true"``),
so users may pass either; :func:`fisherlab.checks.parse_enum` turns a string into a member with an
:class:`~fisherlab.errors.InputError` that lists the valid values.

Structures (:data:`STRUCTURE_TABLE`) — how a Fisher F is stored or approximated, and the metric G a
reconstructed network uses:

===========  =====================================================  ======  ===========  ========
structure    G                                                      fisher  reconstruct  geometry
===========  =====================================================  ======  ===========  ========
``dense``    F itself, P×P (exact NGD; the global local Fisher       yes     yes          yes
             layer)
``block``    one dense block per layer (``by="layer"``, default)     yes     yes          yes
             or per parameter tensor (``by="tensor"``)
``diag``     diag(F)                                                 yes     yes          yes
``implicit`` F, products F·v only (never formed)                     yes     no           no
``kfac``     S ⊗ A per Linear/Conv/Embedding layer (Kronecker        yes     yes          yes
             factors, ``approx="expand"`` or ``"reduce"``)
``input``    I ⊗ A per Linear/Conv layer (input whitening only)      no      yes          yes
``ekfac``    KFAC eigenbasis with re-fitted diagonal scaling         yes     yes          yes
``unit``     one dense block per output unit (row of [W, b])         yes     yes          yes
``lowrank``  top-k eigenpairs (Nyström) plus damping                 yes     no           no
===========  =====================================================  ======  ===========  ========
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class FisherKind(str, Enum):
    """Which Fisher.

    The true Fisher (closed-form expectation over the model's labels), the Monte-Carlo Fisher (sampled labels),
    the empirical Fisher (observed labels) or the generalized Gauss-Newton matrix.
    """

    TRUE = "true"
    MC = "mc"
    EMPIRICAL = "empirical"
    GGN = "ggn"


#: The former name of :class:`FisherKind` (same class).
FisherType = FisherKind


class StructureKind(str, Enum):
    """Which Fisher a fidelity evaluation builds its layer-row structures of (KFAC, EKFAC, unit, diag, block).

    ``auto``: the true Fisher's, or the Monte-Carlo one where the true Fisher has too many output rows a sample
    (:data:`fisherlab.fidelity.rules.TRUE_ROWS_MAX`); else one Fisher kind for all of them.
    """

    AUTO = "auto"
    TRUE = "true"
    MC = "mc"
    EMPIRICAL = "empirical"


class Structure(str, Enum):
    """How a Fisher is stored or approximated (module docstring table)."""

    DENSE = "dense"
    BLOCK = "block"
    DIAG = "diag"
    IMPLICIT = "implicit"
    KFAC = "kfac"
    INPUT = "input"
    EKFAC = "ekfac"
    UNIT = "unit"
    LOWRANK = "lowrank"


class BlockBy(str, Enum):
    """What one block of the block-diagonal structure covers: a layer (module) or a parameter tensor."""

    LAYER = "layer"
    TENSOR = "tensor"


class RootMethod(str, Enum):
    """How a reconstructed network computes its root R (θ' = Rθ, RᵀR = G).

    ``eigh``, ``denman_beavers``, ``newton_schulz``: the symmetric root G^{1/2}; ``cholesky``: R = Lᵀ with
    G = LLᵀ (the same NGD steps, cheaper refreshes); ``lowrank``: every wide Kronecker factor replaced by its top-k
    eigen-part plus mean remainder (a different G).
    """

    EIGH = "eigh"
    DENMAN_BEAVERS = "denman_beavers"
    NEWTON_SCHULZ = "newton_schulz"
    CHOLESKY = "cholesky"
    LOWRANK = "lowrank"


class KronSplit(str, Enum):
    """How KFAC splits λ between its factors, (S + sI) ⊗ (A + aI).

    ``pi``: a = π√λ, s = √λ/π, π² the ratio of the factors' mean eigenvalues; ``sqrt``: a = s = √λ.
    """

    PI = "pi"
    SQRT = "sqrt"


class FoldMode(str, Enum):
    """Where a layer form applies its roots.

    The cheaper side (``auto``), on the activations (``never``, the paper's form) or folded into the weight
    (``always``).
    """

    AUTO = "auto"
    NEVER = "never"
    ALWAYS = "always"


class Unsupported(str, Enum):
    """What a layer-wise structure does with a module that has no layer rule.

    Refuse it (``error``) or keep an exact dense block for it (``block``).
    """

    ERROR = "error"
    BLOCK = "block"


class KFACApprox(str, Enum):
    """How KFAC treats a layer whose weight is shared over L positions (Eschenhagen et al. 2023).

    ``expand``: positions are like extra samples, A = (1/(N·L)) Σ_{n,l} ā ā ᵀ, S = (1/N) Σ_{n,r,l} δ δᵀ (exact
    for deep linear networks when the loss has a term per position, e.g. language modelling); ``reduce``: positions
    are pooled first, ā_n = mean_l ā_{n,l}, δ_{n,r} = Σ_l δ_{n,r,l}, A = (1/N) Σ_n ā_n ā_nᵀ, S = (1/N) Σ_{n,r}
    δ δᵀ (exact for deep linear networks when the positions are pooled before the loss, e.g. sequence
    classification). The two coincide for L = 1.
    """

    EXPAND = "expand"
    REDUCE = "reduce"


class KFACPrecondition(str, Enum):
    """How KFAC-NGD training forms S⁻¹ ∇W̄ A⁻¹.

    From the gradient matrix (``dense``), from the layer's output gradients and inputs (``factored``), or the
    cheaper of the two per layer and step (``auto``).
    """

    AUTO = "auto"
    DENSE = "dense"
    FACTORED = "factored"


@dataclass(frozen=True)
class StructureInfo:
    """One row of :data:`STRUCTURE_TABLE`.

    Attributes:
        fisher: The :func:`fisherlab.fisher` structure G is computed from (None: not a ``fisher`` structure of
            its own).
        options: Options that structure is built with for this row (e.g. ``input`` is KFAC's input side).
        reconstructible: Whether :func:`fisherlab.reconstruct` rebuilds a network with it (and so whether an
            ``sngd-<structure>`` rule and a geometry entry exist).
    """

    fisher: Structure | None
    options: dict[str, Any] = field(default_factory=dict)
    reconstructible: bool = False


#: Structure → how fisher / reconstruct / the rules / geometry use it. The one table: every list of structure
#: names in fisherlab is derived from it.
STRUCTURE_TABLE: dict[Structure, StructureInfo] = {
    Structure.DENSE: StructureInfo(Structure.DENSE, reconstructible=True),
    Structure.BLOCK: StructureInfo(Structure.BLOCK, {"by": BlockBy.LAYER.value}, reconstructible=True),
    Structure.DIAG: StructureInfo(Structure.DIAG, reconstructible=True),
    Structure.IMPLICIT: StructureInfo(Structure.IMPLICIT),
    Structure.KFAC: StructureInfo(Structure.KFAC, reconstructible=True),
    Structure.INPUT: StructureInfo(Structure.KFAC, reconstructible=True),
    Structure.EKFAC: StructureInfo(Structure.EKFAC, reconstructible=True),
    Structure.UNIT: StructureInfo(Structure.UNIT, reconstructible=True),
    Structure.LOWRANK: StructureInfo(Structure.LOWRANK),
}

#: Structures :func:`fisherlab.reconstruct` accepts, in table order.
RECONSTRUCTIBLE: tuple[str, ...] = tuple(s.value for s, info in STRUCTURE_TABLE.items() if info.reconstructible)

class GPTOutput(str, Enum):
    """What :class:`fisherlab.models.GPT` returns: the logits at the last position, or at every position."""

    LAST = "last"
    SEQUENCE = "sequence"


class Backend(str, Enum):
    """The ``torch.distributed`` backend of a run under ``torchrun``: ``auto`` is NCCL on CUDA devices, else gloo."""

    AUTO = "auto"
    GLOO = "gloo"
    NCCL = "nccl"


#: Target label of a token that carries no prediction target (a prompt or padding position): torch's
#: ``ignore_index`` of ``nn.CrossEntropyLoss``. Such tokens contribute nothing to the loss (a mean over the
#: other tokens) or to any Fisher (docs/sequences.md).
IGNORE_INDEX: int = -100

#: Deprecated spellings → the name that replaced them.
STRUCTURE_ALIASES: dict[str, str] = {"full": "dense"}

__all__ = ["IGNORE_INDEX", "RECONSTRUCTIBLE", "STRUCTURE_ALIASES", "STRUCTURE_TABLE", "Backend", "BlockBy",
           "FisherKind", "FisherType", "FoldMode", "GPTOutput", "KFACApprox", "KFACPrecondition", "KronSplit",
           "RootMethod", "Structure", "StructureInfo", "StructureKind", "Unsupported"]
