"""The parametrization form of a local Fisher layer: W = unvec(G^{-1/2} vec(W')) for any parameter tensors.

docs/method.md: any group of parameter tensors (an LSTM's weights, a norm's scale, an embedding, a user's bare
parameter, or the whole network) is rebuilt by ``torch.nn.utils.parametrize``: each tensor T_i of the group
becomes a function of the group's reconstructed coordinates,

    T_i = [G_g^{-1/2} θ'_g]_i,     θ'_g = (T'_1, T'_2, ...) = G_g^{1/2} θ_g,

where θ_g is the group vector (the tensors flattened row-major and concatenated in model order). Each T'_i has
T_i's shape and is the ``parametrizations.<name>.original`` parameter of T_i's module, so the optimizer sees P
parameters, exactly as many as the original network. The roots of G_g live in one :class:`FisherRoot` module
(buffers), used by the parametrizations of all the group's tensors; a tensor reads the other members' T'_j when
the group is coupled (dense, Kronecker, eigenbasis and unit-wise roots of a weight and its bias). The root is
registered once, under its first member (``<module>.parametrizations.<name>.0.root``).

Roots (G_g + λI in each case, except Kronecker: see :class:`KroneckerRoot`), with the statistics they take:

* :class:`DenseRoot` — any SPD matrix over the group vector; ``G`` (P_g, P_g).
* :class:`DiagonalRoot` — diag(d); ``diagonal`` (P_g,).
* :class:`KroneckerRoot` — (S + sI) ⊗ (A + aI) on the row-major W̄ = [W_flat, b]; ``A`` (n, n), ``S`` (m, m).
  An Embedding's W̄ is its weight transposed (``transposed=True``) and, under KFAC's "expand", its A is diagonal
  (``diagonal_input=True``: ``A`` given as its diagonal (n,)).
* :class:`EigenbasisRoot` — (Q_S ⊗ Q_A) diag(vec D) (Q_S ⊗ Q_A)ᵀ on W̄; ``Q_A``, ``Q_S``, ``scaling`` D (m, n).
* :class:`UnitRoot` — one dense (n, n) block per row of W̄ (output unit); ``blocks`` (m, n, n).

:func:`parametrize_group` registers a root on a module's tensors and sets T'_i so that the function is
unchanged. Autograd differentiates through the root's *use* (∇θ' L = G^{-1/2} ∇θ L) but never into the
roots themselves: they are buffers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from fisherlab.errors import InputError, ReadOnlyTensorError
from fisherlab.reconstruction.local_layers import InputWhitening, OutputFisher, kron_apply, kron_update
from fisherlab.reconstruction.roots import (
    CombinedLayout,
    LocalFisherUnit,
    TransposedLayout,
    batched_damped_roots,
    damped_root,
    flatten,
    inverse_root_rows,
    positive_roots,
)

__all__ = [
    "DenseRoot",
    "DiagonalRoot",
    "EigenbasisRoot",
    "FisherParametrization",
    "FisherRoot",
    "KroneckerRoot",
    "UnitRoot",
    "parametrize_group",
]


class FisherRoot(LocalFisherUnit):
    """Roots of G_g for a group of parametrized tensors (the unit of the parametrization form).

    The member tensors are registered by :func:`parametrize_group`; :meth:`primes` returns their
    ``original`` parameters T'_i, :meth:`member` computes T_i from them.

    Args:
        shapes: Shapes of the member tensors, in group order.
        dtype: Dtype of the root buffers.
        device: Device of the root buffers.
    """

    def __init__(self, shapes: Sequence[torch.Size], dtype: torch.dtype, device: torch.device | None):
        super().__init__(shapes)
        self._factory = {"dtype": dtype, "device": device}
        # the ParametrizationList of each member (a plain list: the members are registered elsewhere)
        self._members: list[parametrize.ParametrizationList] = []

    def _eye(self, n: int) -> Tensor:
        return torch.eye(n, **self._factory)

    def primes(self) -> list[Tensor]:
        if len(self._members) != len(self.shapes):
            raise InputError(f"{type(self).__name__} has {len(self._members)} registered members, expected "
                             f"{len(self.shapes)} (register it with parametrize_group)")
        return [m.original for m in self._members]

    def member(self, k: int, primes: Sequence[Tensor]) -> Tensor:
        """T_k = [G_g^{-1/2} θ'_g]_k from the member parameters θ' (differentiable in θ'), shape ``shapes[k]``."""
        raise NotImplementedError


class DenseRoot(FisherRoot):
    """Dense G_g = G + λI over the group vector (structures ``full`` and ``block``).

    Buffers ``sqrt`` and ``inv_sqrt`` of shape (P_g, P_g). A member reads only its rows of G^{-1/2}, so one forward
    pass costs one (P_g × P_g) product for the whole group. With ``sqrt="cholesky"`` ``sqrt`` is the upper
    triangular R = Lᵀ and ``inv_sqrt`` is empty (0,): R⁻¹ is applied by triangular solves, not formed
    (:func:`~fisherlab.reconstruction.roots.damped_root`; member k solves the trailing block R[a:, a:] of its
    offset a); a state dict says which by the shape of its ``inv_sqrt`` and loads into either. Optional statistic
    ``"cholesky"``: the structure's lower Cholesky factor of sym(G) + λI at this λ, which the Cholesky root uses
    instead of factorising.
    """

    statistics = ("G",)

    def __init__(self, shapes: Sequence[torch.Size], dtype: torch.dtype, device: torch.device | None = None):
        super().__init__(shapes, dtype, device)
        self.register_buffer("sqrt", self._eye(self.dim))
        self.register_buffer("inv_sqrt", self._eye(self.dim))

    def _apply_rows(self, V: Tensor, power: float) -> Tensor:
        if power < 0 and self.inv_sqrt.numel() == 0:
            return inverse_root_rows(self.sqrt, V)
        return V @ (self.sqrt if power > 0 else self.inv_sqrt).mT

    def member(self, k: int, primes: Sequence[Tensor]) -> Tensor:
        a, b = self.offsets[k], self.offsets[k + 1]
        theta = flatten(primes, self.shapes)
        if self.inv_sqrt.numel() == 0:  # (R⁻¹θ')[a:b] = R[a:, a:]⁻¹ θ'[a:] restricted to its first b − a entries
            return inverse_root_rows(self.sqrt[a:, a:], theta[a:].unsqueeze(0))[0, : b - a].reshape(self.shapes[k])
        return (self.inv_sqrt[a:b] @ theta).reshape(self.shapes[k])

    def update(self, stats: Mapping[str, Tensor], damping: float, method: str, rank: int = 64) -> None:
        self._check_stats(stats)
        sqrt, inv_sqrt = damped_root(stats["G"].to(self.sqrt), damping, method, stats.get("cholesky"))
        self.sqrt, self.inv_sqrt = sqrt, self.sqrt.new_empty(0) if inv_sqrt is None else inv_sqrt

    def _load_from_state_dict(self, state_dict: Mapping[str, Tensor], prefix: str, *args: Any) -> None:
        inv_sqrt = state_dict.get(prefix + "inv_sqrt")
        if inv_sqrt is not None and inv_sqrt.shape != self.inv_sqrt.shape:  # the other root form: take its shape
            self.inv_sqrt = self.inv_sqrt.new_empty(inv_sqrt.shape)
        super()._load_from_state_dict(state_dict, prefix, *args)


class DiagonalRoot(FisherRoot):
    """Diagonal G_g = diag(d) + λI (structure ``diag``); buffers ``sqrt`` and ``inv_sqrt`` of shape (P_g,)."""

    statistics = ("diagonal",)

    def __init__(self, shapes: Sequence[torch.Size], dtype: torch.dtype, device: torch.device | None = None):
        super().__init__(shapes, dtype, device)
        self.register_buffer("sqrt", torch.ones(self.dim, **self._factory))
        self.register_buffer("inv_sqrt", torch.ones(self.dim, **self._factory))

    def _apply_rows(self, V: Tensor, power: float) -> Tensor:
        return V * (self.sqrt if power > 0 else self.inv_sqrt)

    def member(self, k: int, primes: Sequence[Tensor]) -> Tensor:
        return primes[k] * self.inv_sqrt[self.offsets[k]: self.offsets[k + 1]].reshape(self.shapes[k])

    def update(self, stats: Mapping[str, Tensor], damping: float, method: str, rank: int = 64) -> None:
        self._check_stats(stats)
        self.sqrt, self.inv_sqrt = positive_roots(stats["diagonal"].to(self.sqrt), damping, "diag(F)")


class _MatrixRoot(FisherRoot):
    """A root acting on the combined matrix W̄ (m, n) of tensors that share their leading dimension.

    ``transposed``: the group is one 2-D weight whose W̄ is its transpose (:class:`TransposedLayout`, an Embedding).
    """

    def __init__(self, shapes: Sequence[torch.Size], dtype: torch.dtype, device: torch.device | None = None,
                 transposed: bool = False):
        super().__init__(shapes, dtype, device)
        if transposed and len(self.shapes) != 1:
            raise InputError(f"a transposed W̄ is one weight; got shapes {[tuple(s) for s in self.shapes]}")
        self.layout = TransposedLayout(self.shapes[0]) if transposed else CombinedLayout(self.shapes)

    def _apply_rows(self, V: Tensor, power: float) -> Tensor:
        return self.layout.matrix_to_flat(self._apply_matrix(self.layout.flat_to_matrix(V), power))

    def _apply_matrix(self, M: Tensor, power: float) -> Tensor:
        """G^p on combined matrices (*B, m, n)."""
        raise NotImplementedError


class KroneckerRoot(_MatrixRoot):
    """G_g = (S + sI) ⊗ (A + aI) on the row-major W̄ (KFAC), or I ⊗ (A + λI) with ``output=False`` (input only).

    The damping λ is split between the factors by :func:`fisherlab.linalg.kron_damping_split` with ``split``
    (``"pi"``: a = π√λ, s = √λ/π; ``"sqrt"``: a = s = √λ), so G^{±1/2} = (S + sI)^{±1/2} ⊗ (A + aI)^{±1/2} and
    T = [(S + sI)^{-1/2} W̄' (A + aI)^{-1/2}] restricted to T's columns. The factor roots live in the same
    :class:`~fisherlab.reconstruction.local_layers.InputWhitening` / ``OutputFisher`` modules as in the layer form.

    Args:
        shapes: Member shapes (common leading dimension m).
        dtype: Buffer dtype.
        device: Buffer device.
        split: Damping split between A and S.
        output: Whether the metric has an output factor S (False: input whitening only).
        transposed: W̄ is the one member transposed (an Embedding's weight (V, d): W̄ (d, V)).
        diagonal_input: A is diagonal and given as its diagonal (n,) (an Embedding under "expand").
    """

    def __init__(self, shapes: Sequence[torch.Size], dtype: torch.dtype, device: torch.device | None = None,
                 *, split: str = "pi", output: bool = True, transposed: bool = False, diagonal_input: bool = False):
        super().__init__(shapes, dtype, device, transposed)
        self.split = split
        self.statistics = ("A", "S") if output else ("A",)
        self.input_whitening = InputWhitening(self.layout.n, homogeneous=False, dtype=dtype, device=device,
                                              diagonal=diagonal_input)
        self.output_fisher = OutputFisher(self.layout.rows, dtype=dtype, device=device) if output else None

    def _apply_matrix(self, M: Tensor, power: float) -> Tensor:
        return kron_apply(M, self.input_whitening, self.output_fisher, power)

    def member(self, k: int, primes: Sequence[Tensor]) -> Tensor:
        a, b = self.layout.edges[k], self.layout.edges[k + 1]
        out = self.input_whitening.right(self.layout.to_matrix(primes), -0.5, slice(a, b))
        if self.output_fisher is not None:
            out = self.output_fisher.fold(out)
        return self.layout.member_from_columns(k, out)

    def update(self, stats: Mapping[str, Tensor], damping: float, method: str, rank: int = 64) -> None:
        self._check_stats(stats)
        kron_update(self.input_whitening, self.output_fisher, stats, damping, method, self.split, rank)


class EigenbasisRoot(_MatrixRoot):
    """G_g = (Q_S ⊗ Q_A) diag(vec D + λ) (Q_S ⊗ Q_A)ᵀ on the row-major W̄ (EKFAC).

    Statistics: ``Q_A`` (n, n) and ``Q_S`` (m, m), orthogonal eigenbases of the KFAC factors, and ``scaling``
    D (m, n), the second moments of the gradient in that basis. G^p W̄ = Q_S [(Q_Sᵀ W̄ Q_A) ⊙ (D + λ)^p] Q_Aᵀ.
    Buffers ``q_a``, ``q_s``, ``scaling_sqrt`` and ``scaling_inv_sqrt``. With ``diagonal_input`` (an Embedding under
    "expand", whose A is diagonal) Q_A is diagonal and given as its diagonal (n,) (ones), never as n × n.
    """

    statistics = ("Q_A", "Q_S", "scaling")

    def __init__(self, shapes: Sequence[torch.Size], dtype: torch.dtype, device: torch.device | None = None,
                 transposed: bool = False, diagonal_input: bool = False):
        super().__init__(shapes, dtype, device, transposed)
        m, n = self.layout.rows, self.layout.n
        self.register_buffer("q_a", torch.ones(n, **self._factory) if diagonal_input else self._eye(n))
        self.register_buffer("q_s", self._eye(m))
        self.register_buffer("scaling_sqrt", torch.ones(m, n, **self._factory))
        self.register_buffer("scaling_inv_sqrt", torch.ones(m, n, **self._factory))

    def _basis(self, M: Tensor, transpose: bool, cols: slice = slice(None)) -> Tensor:
        """M Q_A (``transpose`` False) or M (Q_A[cols])ᵀ (True) for matrices M (*B, m, ·); a diagonal Q_A scales."""
        if self.q_a.dim() == 1:
            return M[..., cols] * self.q_a[cols]
        return M @ (self.q_a[cols].T if transpose else self.q_a)

    def _apply_matrix(self, M: Tensor, power: float) -> Tensor:
        D = self.scaling_sqrt if power > 0 else self.scaling_inv_sqrt
        return self._basis(self.q_s @ (self._basis(self.q_s.T @ M, False) * D), True)

    def member(self, k: int, primes: Sequence[Tensor]) -> Tensor:
        a, b = self.layout.edges[k], self.layout.edges[k + 1]
        inner = self._basis(self.q_s.T @ self.layout.to_matrix(primes), False) * self.scaling_inv_sqrt
        return self.layout.member_from_columns(k, self._basis(self.q_s @ inner, True, slice(a, b)))

    def update(self, stats: Mapping[str, Tensor], damping: float, method: str, rank: int = 64) -> None:
        self._check_stats(stats)
        if stats["Q_A"].dim() != self.q_a.dim():
            raise InputError(f"EigenbasisRoot ({'diagonal' if self.q_a.dim() == 1 else 'dense'} input basis) got Q_A "
                             f"of shape {tuple(stats['Q_A'].shape)}")
        self.scaling_sqrt, self.scaling_inv_sqrt = positive_roots(stats["scaling"].to(self.q_a), damping,
                                                                  "the EKFAC scaling")
        self.q_a, self.q_s = stats["Q_A"].to(self.q_a), stats["Q_S"].to(self.q_a)


class UnitRoot(_MatrixRoot):
    """Unit-wise G_g: one dense block B_i + λI per row i of W̄ (an output unit with its incoming weights and bias).

    Buffers ``sqrt`` and ``inv_sqrt`` of shape (m, n, n); statistics ``blocks`` (m, n, n).
    """

    statistics = ("blocks",)

    def __init__(self, shapes: Sequence[torch.Size], dtype: torch.dtype, device: torch.device | None = None,
                 transposed: bool = False):
        super().__init__(shapes, dtype, device, transposed)
        m, n = self.layout.rows, self.layout.n
        self.register_buffer("sqrt", self._eye(n).expand(m, n, n).clone())
        self.register_buffer("inv_sqrt", self._eye(n).expand(m, n, n).clone())

    def _apply_matrix(self, M: Tensor, power: float) -> Tensor:
        R = self.sqrt if power > 0 else self.inv_sqrt
        return torch.einsum("mij,...mj->...mi", R, M)

    def member(self, k: int, primes: Sequence[Tensor]) -> Tensor:
        a, b = self.layout.edges[k], self.layout.edges[k + 1]
        out = torch.einsum("mij,mj->mi", self.inv_sqrt[:, a:b], self.layout.to_matrix(primes))
        return self.layout.member_from_columns(k, out)

    def update(self, stats: Mapping[str, Tensor], damping: float, method: str, rank: int = 64) -> None:
        self._check_stats(stats)
        blocks = stats["blocks"].to(self.sqrt)
        if blocks.shape != self.sqrt.shape:
            raise InputError(f"unit-wise blocks must have shape {tuple(self.sqrt.shape)}; got {tuple(blocks.shape)}")
        self.sqrt, self.inv_sqrt = batched_damped_roots(blocks, damping, method)


class FisherParametrization(nn.Module):
    """The parametrization of member ``index`` of a :class:`FisherRoot`: T' ↦ T = [G_g^{-1/2} θ'_g]_index.

    Registered with ``torch.nn.utils.parametrize`` (the module's ``original`` is T'). The root is a submodule of
    member 0's parametrization only (the others refer to it without registering it), so its buffers appear once
    in ``named_buffers()`` and ``state_dict()`` and are never tied. The parametrized tensor is read-only: assigning
    it raises :class:`~fisherlab.reconstruction.ReadOnlyTensorError` (use
    :meth:`~fisherlab.reconstruction.ReconstructedNetwork.load_original`).
    """

    def __init__(self, root: FisherRoot, index: int):
        super().__init__()
        if index == 0:
            self.root = root
        else:
            self._root = (root,)
        self.index = index
        self.registered = False  # set by parametrize_group once registered: assignments are refused from then on

    @property
    def group(self) -> FisherRoot:
        """The root of the group."""
        return self.root if self.index == 0 else self._root[0]

    def forward(self, original: Tensor) -> Tensor:
        """T_index from this member's T' (``original``) and the other members' T'."""
        root = self.group
        primes = [original if i == self.index else m.original for i, m in enumerate(root._members)]
        return root.member(self.index, primes).contiguous()  # e.g. a strided conv weight is much slower

    def right_inverse(self, value: Tensor) -> Tensor:
        """Refuse assignment to the parametrized tensor (ReadOnlyTensorError); at registration, the identity.

        ``torch.nn.utils.parametrize`` calls this once while registering (θ' is then set by
        :func:`parametrize_group`) and on every later assignment ``module.<name> = value``.
        """
        if self.registered:
            raise ReadOnlyTensorError(
                f"this tensor is the effective original-coordinate tensor T = [G^{{-1/2}} θ']_{self.index} of a "
                f"{type(self.group).__name__} local Fisher unit, read-only: train its parametrizations.<name>."
                "original (θ'), or set θ with ReconstructedNetwork.load_original")
        return value

    def extra_repr(self) -> str:
        return f"member {self.index} of {type(self.group).__name__}"


def parametrize_group(model: nn.Module, names: Sequence[str], root: FisherRoot) -> None:
    """Rebuild the tensors ``names`` of ``model`` (paths such as ``"lstm.weight_ih_l0"``) through ``root``.

    Each tensor becomes ``parametrizations.<attr>.original`` = T' of its owning module; the values are set to
    θ'_g = G_g^{1/2} θ_g with the root's current G, so the function of ``model`` is unchanged.

    Args:
        model: The module holding the tensors (modified in place).
        names: Parameter paths, in group order (matching ``root.shapes``).
        root: The root of the group (not yet registered).

    Raises:
        InputError: Wrong number or shapes of tensors, or a tensor that is already parametrized.
    """
    if len(names) != len(root.shapes):
        raise InputError(f"{type(root).__name__} covers {len(root.shapes)} tensors; got names {list(names)}")
    theta = []
    for name, shape in zip(names, root.shapes, strict=True):
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        if parametrize.is_parametrized(module, attr):
            raise InputError(f"parameter {name!r} is already parametrized")
        tensor = getattr(module, attr)
        if tensor.shape != shape:
            raise InputError(f"parameter {name!r} has shape {tuple(tensor.shape)}, the root expects {tuple(shape)}")
        theta.append(tensor.detach().clone())
    for k, name in enumerate(names):
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        parametrization = FisherParametrization(root, k)
        parametrize.register_parametrization(module, attr, parametrization, unsafe=True)
        parametrization.registered = True
        root._members.append(module.parametrizations[attr])
    root.load_theta(flatten(theta, root.shapes))
