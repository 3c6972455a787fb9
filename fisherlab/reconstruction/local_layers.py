"""The layer form of a local Fisher layer: explicit modules around a Linear or Conv weight (METHOD.md §4).

A supported layer y = W̄ ā (ā = [a; 1] when it has a bias; for a convolution, a is each input patch) with KFAC
metric G = (S + sI) ⊗ (A + aI) is rebuilt as

    y = S_s^{-1/2} · W̄' · (A_a^{-1/2} ā),        W̄' = S_s^{1/2} W̄ A_a^{1/2},

three modules in sequence: :class:`InputWhitening` (A_a^{-1/2}), the weight W̄' — the layer's only parameter,
``weight_prime`` — and :class:`OutputFisher` (S_s^{-1/2}); with ``output=False`` (structure ``input``) the metric
is I ⊗ (A + λI) and there is no output layer. ``print(net)`` shows them. One GD step on W̄' maps back to
ΔW̄ = −η S_s^{-1} ∇W̄ L A_a^{-1}, the KFAC step.

**The interface of the replaced layer.** A layer form keeps the attributes code reads from the layer it replaces:
``weight`` and ``bias`` are the *effective* original-coordinate tensors (W̄ = S_s^{-1/2} W̄' A_a^{-1/2}, split back
into the original weight and bias shapes; ``bias`` None without one), computed from W̄' and the roots on every read
and differentiable in W̄', and read-only (assigning them raises
:class:`~fisherlab.reconstruction.ReadOnlyTensorError`, an AttributeError: train ``weight_prime``);
``in_features``/``out_features`` (Linear), ``in_channels``/``out_channels`` (Conv) are kept too. So torch's own
modules that read ``linear1.weight`` / ``linear1.bias`` (``nn.TransformerEncoderLayer``'s fast-path check and fused
kernel) and user code that reads ``layer.weight`` work on a reconstructed network.

With ``sqrt="cholesky"`` the symmetric roots are replaced by triangular factors (A_a = L_A L_Aᵀ, S_s = L_S L_Sᵀ):
y = L_S^{-T} · W̄' · (L_A^{-1} ā), W̄' = L_Sᵀ W̄ L_A — InputWhitening applies the lower triangular L_A^{-1},
OutputFisher the upper triangular L_S^{-T} — and the GD step on W̄' maps back to the same KFAC step (only the
coordinates W̄' differ; see :mod:`~fisherlab.reconstruction.roots`). With ``sqrt="lowrank"`` each factor wider than
2k is replaced by its top-k eigen-part plus its mean remainder (:func:`~fisherlab.reconstruction.roots.lowrank_roots`):
a different G, whose roots the modules apply in O(n·k) per row instead of O(n²).

**Where the roots are applied.** A root can act on the activations (the paper's form: cost ∝ rows · n² per
forward, rows = samples × locations) or be folded into the weight (W̄' A^{-1/2}: cost ∝ out · n², independent of
the batch). Both compute the same function (to round-off); ``fold="auto"`` (default) picks the cheaper one per
side and per call, ``"never"`` always whitens activations, ``"always"`` always folds. A convolution always folds
the input side (its patches are never formed) and applies S^{-1/2} across channels.

The damping split (a, s) with a·s = λ is :func:`fisherlab.linalg.kron_damping_split` with ``split="pi"``
(default; a = π√λ, s = √λ/π, π² = (tr A/dim A)/(tr S/dim S), as :meth:`KFACFisher.solve` and
:meth:`KFACFisher.inv_sqrt_factors`) or ``"sqrt"`` (a = s = √λ).

:data:`LAYER_FORMS` maps a module type to the factory of its layer form; :func:`register_layer_form` adds one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from fisherlab.checks import parse_enum
from fisherlab.errors import InputError, ReadOnlyTensorError
from fisherlab.linalg import kron_damping_split
from fisherlab.reconstruction.roots import (
    CombinedLayout,
    LocalFisherUnit,
    LowRank,
    damped_roots,
    lowrank_roots,
    positive_roots,
)
from fisherlab.vocabulary import FoldMode

__all__ = [
    "FOLD_MODES",
    "LAYER_FORMS",
    "InputWhitening",
    "LocalFisherConv",
    "LocalFisherLayer",
    "LocalFisherLinear",
    "OutputFisher",
    "kron_apply",
    "kron_update",
    "register_layer_form",
]

#: Where a layer form applies its roots: chosen by cost, on the activations, or folded into the weight.
FOLD_MODES: tuple[str, ...] = tuple(m.value for m in FoldMode)


class FactorRoot(nn.Module):
    """One Kronecker factor's roots (buffers ``sqrt``, ``inv_sqrt`` of shape (n, n), or (n,) when ``diagonal``).

    ``inv_sqrt`` is the matrix the module applies (M^{-1/2}, or a triangular factor of M⁻¹ with ``sqrt="cholesky"``)
    and ``sqrt`` its inverse. A diagonal factor (``diagonal=True``: the input factor of an Embedding under KFAC's
    "expand", the token frequencies) keeps both roots as their diagonals (n,), so that no n × n matrix is formed
    (every root method gives the same, exact, diagonal roots). A low-rank root (``sqrt="lowrank"``) also keeps
    ``inv_sqrt`` = s·I + U diag(c) Uᵀ in that form (buffers ``basis`` U (n, k), ``coef`` c (k,), ``shift`` s; None
    otherwise), which the forward pass and the fold use. The form is a cache of ``inv_sqrt`` and is left out of
    ``state_dict`` (a state dict loads into a network built with any root method; the dense roots it carries
    compute the same function).
    """

    def __init__(self, n: int, dtype: torch.dtype | None = None, device: torch.device | None = None,
                 diagonal: bool = False):
        super().__init__()
        self.diagonal = diagonal
        one = torch.ones(n, dtype=dtype, device=device) if diagonal else torch.eye(n, dtype=dtype, device=device)
        self.register_buffer("sqrt", one)
        self.register_buffer("inv_sqrt", one.clone())
        for name in ("basis", "coef", "shift"):  # a cache of inv_sqrt: not in state_dict, which stays root-agnostic
            self.register_buffer(name, None, persistent=False)

    def root(self, power: float) -> Tensor:
        """``sqrt`` (power = 1/2) or ``inv_sqrt`` (power = −1/2)."""
        return self.sqrt if power > 0 else self.inv_sqrt

    def set_roots(self, sqrt: Tensor, inv_sqrt: Tensor, lowrank: LowRank | None = None) -> None:
        """Replace both roots (n, n), and the low-rank form (U, c, s) of ``inv_sqrt`` if it has one."""
        if sqrt.shape != self.sqrt.shape or inv_sqrt.shape != self.inv_sqrt.shape:
            raise InputError(f"{type(self).__name__} roots must have shape {tuple(self.sqrt.shape)}; got "
                             f"{tuple(sqrt.shape)} and {tuple(inv_sqrt.shape)}")
        self.sqrt, self.inv_sqrt = sqrt.to(self.sqrt), inv_sqrt.to(self.inv_sqrt)
        self.basis, self.coef, self.shift = (None,) * 3 if lowrank is None else (t.to(self.sqrt) for t in lowrank)

    def right(self, M: Tensor, power: float, cols: slice = slice(None)) -> Tensor:
        """M R[:, cols] for matrices M (*B, ·, n), R = :meth:`root` (power); a diagonal R scales M's columns."""
        R = self.root(power)
        return M[..., cols] * R[cols] if self.diagonal else M @ R[:, cols]

    def _lowrank_rows(self, x: Tensor) -> Tensor:
        """Rows v of x (..., n) ↦ (s·I + U diag(c) Uᵀ) v, in 4nk multiply-adds per row."""
        return self.shift * x + ((x @ self.basis) * self.coef) @ self.basis.mT

    def extra_repr(self) -> str:
        rank = "" if self.basis is None else f", rank={self.basis.shape[1]}"
        return f"size={self.sqrt.shape[0]}{rank}{', diagonal' if self.diagonal else ''}"


class InputWhitening(FactorRoot):
    """ā ↦ A^{-1/2} ā: the input local Fisher layer (A = E[ā āᵀ] + aI).

    Args:
        width: n, the length of ā.
        homogeneous: Whether ā = [a; 1] ends with the constant 1 (the layer has a bias): the module then maps
            inputs (..., n − 1) to (..., n).
        diagonal: Whether A is diagonal (roots stored as diagonals, :class:`FactorRoot`); not with ``homogeneous``.
    """

    def __init__(self, width: int, homogeneous: bool, dtype: torch.dtype | None = None,
                 device: torch.device | None = None, diagonal: bool = False):
        if diagonal and homogeneous:
            raise InputError("a diagonal input factor belongs to a layer without bias (one-hot inputs)")
        super().__init__(width, dtype, device, diagonal)
        self.homogeneous = homogeneous

    def forward(self, a: Tensor) -> Tensor:
        """A^{-1/2} ā for inputs a (..., n − homogeneous); returns (..., n)."""
        if self.diagonal:
            return a * self.inv_sqrt
        if self.basis is not None:
            return self._lowrank_rows(nnf.pad(a, (0, 1), value=1.0) if self.homogeneous else a)
        Z = self.inv_sqrt
        return nnf.linear(a, Z[:, :-1], Z[:, -1]) if self.homogeneous else nnf.linear(a, Z)

    def fold(self, W: Tensor) -> Tensor:
        """W A^{-1/2} for a weight W (out, n): the same map applied through the weight."""
        return self.right(W, -0.5) if self.basis is None else self._lowrank_rows(W)  # a low-rank root is symmetric

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, homogeneous={self.homogeneous}"


class OutputFisher(FactorRoot):
    """y ↦ S^{-1/2} y: the output local Fisher layer (S = E[δ δᵀ] + sI), along dimension ``dim`` of y.

    Args:
        features: m, the layer's outputs (features of a Linear, channels of a Conv).
        dim: The feature dimension of y: −1 (Linear) or 1 (Conv, y of shape (N, m, *spatial)).
    """

    def __init__(self, features: int, dim: int = -1, dtype: torch.dtype | None = None,
                 device: torch.device | None = None):
        super().__init__(features, dtype, device)
        self.dim = dim

    def forward(self, y: Tensor) -> Tensor:
        """S^{-1/2} applied along ``dim``; same shape as y."""
        if self.basis is not None:
            return self._lowrank_rows(y.movedim(self.dim, -1)).movedim(-1, self.dim)
        if self.dim == -1:
            return nnf.linear(y, self.inv_sqrt)
        return torch.einsum("ij,nj...->ni...", self.inv_sqrt, y)

    def fold(self, W: Tensor) -> Tensor:
        """S^{-1/2} W for a weight W (m, n)."""
        return self.inv_sqrt @ W if self.basis is None else self._lowrank_rows(W.mT).mT  # symmetric


def kron_apply(M: Tensor, inp: FactorRoot, out: FactorRoot | None, power: float) -> Tensor:
    """(S^p ⊗ A^p) on combined matrices M (*B, m, n): S^p M A^p (S = I when ``out`` is None)."""
    M = inp.right(M, power)
    return M if out is None else out.root(power) @ M


def factor_roots(M: Tensor, damping: float, method: str, rank: int) -> tuple[Tensor, Tensor, LowRank | None]:
    """(R, R⁻¹, low-rank form of R⁻¹ or None) of one damped Kronecker factor M + δI (n, n), RᵀR = M + δI.

    ``"lowrank"``: :func:`~fisherlab.reconstruction.roots.lowrank_roots` with ``rank``; otherwise
    :func:`~fisherlab.reconstruction.roots.damped_roots`.
    """
    if method == "lowrank":
        return lowrank_roots(M, damping, rank)
    return (*damped_roots(M, damping, method), None)


def kron_update(inp: FactorRoot, out: FactorRoot | None, stats: Mapping[str, Tensor], damping: float,
                method: str, split: str, rank: int = 64) -> None:
    """Set the roots of (S + sI) ⊗ (A + aI) ((a, s) = ``split`` of λ), or of I ⊗ (A + λI) when ``out`` is None.

    ``rank``: k of ``method="lowrank"``. A diagonal ``inp`` takes A as its diagonal (n,) (an Embedding's token
    frequencies; its π uses tr A / dim A = mean of the diagonal) and gets the exact roots (A + aI)^{±1/2} whatever
    ``method``.

    Raises:
        InputError: A is a diagonal (n,) for a dense ``inp`` or a matrix for a diagonal one.
        SingularMatrixError: A damped factor is not positive definite.
    """
    A = stats["A"].to(inp.sqrt)
    if A.dim() != inp.sqrt.dim():
        raise InputError(f"{type(inp).__name__} ({'diagonal' if inp.diagonal else 'dense'}) got an input factor of "
                         f"shape {tuple(A.shape)}")
    da, ds = (damping, 0.0) if out is None else kron_damping_split(A, stats["S"].to(out.sqrt), damping, split)
    if inp.diagonal:
        inp.set_roots(*positive_roots(A, da, "the diagonal input factor A (token frequencies)"))
    else:
        sqrt, inv_sqrt, lowrank = factor_roots(A, da, method, rank)
        inp.set_roots(sqrt.mT, inv_sqrt.mT, lowrank)  # W̄ = W̄' R_A^{-T}: the input side is transposed
    if out is not None:
        out.set_roots(*factor_roots(stats["S"].to(out.sqrt), ds, method, rank))


class LocalFisherLayer(LocalFisherUnit):
    """Base class of the layer forms: InputWhitening → W̄' → OutputFisher (see the module docstring).

    The only parameter is ``weight_prime``, W̄' of shape (out, n) = [W'_flat, b']. Group vectors (the unit's
    restriction of the flat parameter vector) list the original weight row-major, then the bias. ``weight`` and
    ``bias`` are the read-only effective tensors of the original layer (module docstring).

    Args:
        shapes: Shapes of the original weight and (if any) bias.
        output: Whether the metric has an output factor S.
        split: Damping split ``"pi"`` or ``"sqrt"``.
        fold: ``"auto"``, ``"never"`` or ``"always"`` (where roots are applied).
        feature_dim: Dimension of the output features (−1 Linear, 1 Conv).
    """

    def __init__(self, shapes: Sequence[torch.Size], *, output: bool, split: str, fold: str, feature_dim: int,
                 dtype: torch.dtype | None = None, device: torch.device | None = None):
        super().__init__(shapes)
        fold = parse_enum(FoldMode, fold, "fold mode").value
        self.layout = CombinedLayout(self.shapes)
        self.split, self.fold = split, fold
        self.statistics = ("A", "S") if output else ("A",)
        m, n = self.layout.rows, self.layout.n
        self.input_whitening = InputWhitening(n, homogeneous=len(self.shapes) == 2, dtype=dtype, device=device)
        self.weight_prime = nn.Parameter(torch.zeros(m, n, dtype=dtype, device=device))
        self.output_fisher = OutputFisher(m, feature_dim, dtype, device) if output else None

    @property
    def has_bias(self) -> bool:
        """Whether the layer has a bias (the last column of W̄)."""
        return len(self.shapes) == 2

    @property
    def weight(self) -> Tensor:
        """The original layer's effective weight (its shape), from W̄' and the roots; read-only."""
        return self.layout.from_matrix(self.effective_weight())[0]

    @property
    def bias(self) -> Tensor | None:
        """The original layer's effective bias (None without one), from W̄' and the roots; read-only."""
        return self.layout.from_matrix(self.effective_weight())[1] if self.has_bias else None

    def __setattr__(self, name: str, value: object) -> None:
        """Refuse ``weight`` / ``bias`` (tensors, parameters or None) with :class:`ReadOnlyTensorError`."""
        if name in ("weight", "bias"):
            raise ReadOnlyTensorError(
                f"{type(self).__name__}.{name} is the effective original-coordinate {name} (from "
                "S^{-1/2} W̄' A^{-1/2}), read-only: train weight_prime (W̄'), or set θ with "
                "ReconstructedNetwork.load_original")
        super().__setattr__(name, value)

    def primes(self) -> list[Tensor]:
        return [self.weight_prime]

    def primes_to_flat(self, tensors: Sequence[Tensor]) -> Tensor:
        return self.layout.matrix_to_flat(tensors[0])

    def flat_to_primes(self, v: Tensor) -> list[Tensor]:
        return [self.layout.flat_to_matrix(v)]

    def _apply_rows(self, V: Tensor, power: float) -> Tensor:
        M = kron_apply(self.layout.flat_to_matrix(V), self.input_whitening, self.output_fisher, power)
        return self.layout.matrix_to_flat(M)

    def update(self, stats: Mapping[str, Tensor], damping: float, method: str, rank: int = 64) -> None:
        self._check_stats(stats)
        kron_update(self.input_whitening, self.output_fisher, stats, damping, method, self.split, rank)

    def _folds(self, rows: int) -> tuple[bool, bool]:
        """(fold the input root, fold the output root) for a call with ``rows`` rows of activations.

        Folding A^{-1/2} costs out·n² instead of rows·n², folding S^{-1/2} costs out²·n instead of rows·out².
        """
        if self.fold != "auto":
            return (self.fold == "always",) * 2
        m, n = self.layout.rows, self.layout.n
        return m < rows, self.output_fisher is not None and n < rows

    def effective_weight(self) -> Tensor:
        """W̄ = S^{-1/2} W̄' A^{-1/2} (out, n), the original layer's combined weight (differentiable in W̄')."""
        return kron_apply(self.weight_prime, self.input_whitening, self.output_fisher, -0.5)

    def extra_repr(self) -> str:
        m, n = self.layout.rows, self.layout.n
        return f"weight_prime W̄' ({m}, {n}), bias={self.has_bias}, split={self.split!r}, fold={self.fold!r}"


class LocalFisherLinear(LocalFisherLayer):
    """Layer form of ``nn.Linear``: y = S^{-1/2} W̄' A^{-1/2} [x; 1], inputs (..., in) → (..., out)."""

    @property
    def in_features(self) -> int:
        """Inputs of the replaced Linear."""
        return self.layout.n - self.has_bias

    @property
    def out_features(self) -> int:
        """Outputs of the replaced Linear."""
        return self.layout.rows

    def forward(self, x: Tensor) -> Tensor:
        """The original layer's output, computed through the local Fisher layers."""
        fold_in, fold_out = self._folds(x.numel() // max(x.shape[-1], 1))
        W = self.output_fisher.fold(self.weight_prime) if fold_out else self.weight_prime
        if fold_in:
            W = self.input_whitening.fold(W)
            y = nnf.linear(x, W[:, :-1], W[:, -1]) if self.has_bias else nnf.linear(x, W)
        else:
            y = nnf.linear(self.input_whitening(x), W)
        return self.output_fisher(y) if self.output_fisher is not None and not fold_out else y

    @classmethod
    def from_layer(cls, layer: nn.Linear, *, output: bool = True, split: str = "pi",
                   fold: str = "auto") -> LocalFisherLinear:
        """The layer form of ``layer`` with identity roots (W̄' = W̄)."""
        shapes = [p.shape for p in (layer.weight, layer.bias) if p is not None]
        new = cls(shapes, output=output, split=split, fold=fold, feature_dim=-1, dtype=layer.weight.dtype,
                  device=layer.weight.device)
        new.load_theta(torch.cat([p.detach().reshape(-1) for p in (layer.weight, layer.bias) if p is not None]))
        return new


class LocalFisherConv(LocalFisherLayer):
    """Layer form of ``nn.Conv1d``/``nn.Conv2d`` (groups = 1; any padding mode).

    Per output location y_l = S^{-1/2} W̄' A^{-1/2} ā_l, ā_l the input patch with a trailing 1 (A: patch
    covariance, S: channel covariance, KFC). The input side is always folded into the weight (W̄' A^{-1/2} is
    convolved with the input, so patches are never formed); S^{-1/2} is applied across channels or folded.
    """

    def __init__(self, shapes: Sequence[torch.Size], conv: nn.Module, **kwargs):
        super().__init__(shapes, feature_dim=1, **kwargs)
        self._conv = (conv,)  # geometry only (stride, padding, ...): its weight and bias were removed
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels

    def forward(self, x: Tensor) -> Tensor:
        """The original convolution's output, computed through the local Fisher layers."""
        _, fold_out = self._folds(x.shape[0] * x[0, 0].numel())
        W = self.input_whitening.fold(self.weight_prime)
        if fold_out:
            W = self.output_fisher.fold(W)
        parts = [p.contiguous() for p in self.layout.from_matrix(W)]  # strided weights make CPU convs ~10× slower
        y = self._conv[0]._conv_forward(x, parts[0], parts[1] if self.has_bias else None)
        return self.output_fisher(y) if self.output_fisher is not None and not fold_out else y

    @classmethod
    def from_layer(cls, layer: nn.Module, *, output: bool = True, split: str = "pi",
                   fold: str = "auto") -> LocalFisherConv:
        """The layer form of a Conv1d/Conv2d ``layer`` with identity roots (W̄' = W̄)."""
        if layer.groups != 1:
            raise InputError(f"the layer form covers convolutions with groups=1; got groups={layer.groups}")
        params = [p for p in (layer.weight, layer.bias) if p is not None]
        geometry = copy.deepcopy(layer)
        for name in ("weight", "bias"):
            geometry._parameters.pop(name, None)
        new = cls([p.shape for p in params], geometry, output=output, split=split, fold=fold,
                  dtype=layer.weight.dtype, device=layer.weight.device)
        new.load_theta(torch.cat([p.detach().reshape(-1) for p in params]))
        return new

    def extra_repr(self) -> str:
        c = self._conv[0]
        return (f"{type(c).__name__}({c.in_channels}, {c.out_channels}, kernel_size={c.kernel_size}, "
                f"stride={c.stride}, padding={c.padding}), " + super().extra_repr())


#: Factory of a layer form: (layer, output=, split=, fold=) → LocalFisherLayer. Extend with register_layer_form.
LayerFormFactory = Callable[..., LocalFisherLayer]

#: Module type (exact match) → factory of its layer form.
LAYER_FORMS: dict[type[nn.Module], LayerFormFactory] = {
    nn.Linear: LocalFisherLinear.from_layer,
    nn.Conv1d: LocalFisherConv.from_layer,
    nn.Conv2d: LocalFisherConv.from_layer,
}


def register_layer_form(cls: type[nn.Module], factory: LayerFormFactory) -> None:
    """Give modules of type ``cls`` a layer form built by ``factory(layer, output=, split=, fold=)``.

    The factory must return a :class:`LocalFisherLayer` computing the layer's function with identity roots;
    the layer also needs a Kronecker rule (:func:`fisherlab.layers.register_layer_rule`) for its factors.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise InputError(f"register_layer_form needs an nn.Module subclass; got {cls!r}")
    LAYER_FORMS[cls] = factory
