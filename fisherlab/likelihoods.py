"""Likelihoods p(y | z): the loss, its gradient in output space, the output-space Fisher Λ(z), sampling, and KL.

docs/method.md. Each likelihood maps a batch of network outputs ``z`` of shape (N, C) to per-sample quantities.
Targets: categorical — int64 labels of shape (N,) in [0, C), C ≥ 2; Gaussian — floats of shape (N, C); Bernoulli —
floats in {0, 1} of shape (N, C). Losses are the per-sample negative log-likelihoods without constants
(the Gaussian loss is ‖z − y‖² / (2σ²)), so L(θ) is their mean.

The Fisher engines only need :meth:`Likelihood.output_factor` (the output-space factor M_n of each Fisher kind,
built from :meth:`Likelihood.fisher_factor`, a square root B of Λ = B Bᵀ, or the gradients and Hessians of the
loss); the GGN uses the Hessian of the loss in ``z`` computed by autograd, independently of the closed forms, which
is how the identity GGN = true Fisher is checked rather than assumed.

**Sequences** (docs/sequences.md). A model with outputs (N, T, C) — T tokens of C logits each, as in language
modelling — is handled by :class:`TokenLikelihood`, which the engine wraps around the user's likelihood: it applies
that likelihood to every token of the outputs flattened to (N, T·C), leaves out the tokens whose label is the
categorical likelihood's ``ignore_index`` (−100, torch's convention), and scales per-sample quantities by
c = N / N_tok so that every average over the N sequences is an average over the N_tok counted tokens.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as nnf
from torch import Tensor
from torch.func import grad, hessian, vmap

from fisherlab.errors import InputError
from fisherlab.vocabulary import IGNORE_INDEX, FisherKind


class Likelihood:
    """Base class. Subclasses implement the closed forms; users may register their own with :func:`register`.

    Attributes:
        name: Registry name.
        ggn_equals_fisher: Whether ∇²_z ℓ = Λ(z) for every target (true for exponential families in their
            natural parameters); a likelihood without that property must set it to False.
    """

    name: ClassVar[str] = ""
    ggn_equals_fisher: ClassVar[bool] = True

    def check_targets(self, z: Tensor, y: Tensor) -> Tensor:
        """Validate targets ``y`` for outputs ``z`` (N, C) and return them in canonical shape and dtype."""
        raise NotImplementedError

    def nll(self, z: Tensor, y: Tensor) -> Tensor:
        """Per-sample negative log-likelihood, shape (N,)."""
        raise NotImplementedError

    def grad_z(self, z: Tensor, y: Tensor) -> Tensor:
        """∇_z ℓ(z_n, y_n), shape (N, C)."""
        raise NotImplementedError

    def fisher_factor(self, z: Tensor) -> Tensor:
        """A factor B_n of the output-space Fisher, Λ(z_n) = B_n B_nᵀ; shape (N, C, R) with R ≤ C."""
        raise NotImplementedError

    def fisher_apply(self, z: Tensor, w: Tensor) -> Tensor:
        """Λ(z_n) w_n for w of shape (N, C); returns (N, C)."""
        raise NotImplementedError

    def sample(self, z: Tensor, num_samples: int, generator: torch.Generator | None) -> Tensor:
        """Targets drawn from p(· | z_n): shape (N, S) for labels, (N, S, C) otherwise."""
        raise NotImplementedError

    def sample_pieces(self, z: Tensor, size: int, num_samples: int, generator: torch.Generator | None) -> Tensor:
        """:meth:`sample` of each piece of ``size`` rows of z in turn, concatenated (one generator, piece by piece)."""
        return torch.cat([self.sample(piece, num_samples, generator) for piece in z.split(size)])

    def kl(self, z_p: Tensor, z_q: Tensor) -> Tensor:
        """KL(p(· | z_p) ‖ p(· | z_q)) per sample, shape (N,), in nats."""
        raise NotImplementedError

    def output_factor(self, kind: FisherKind, z: Tensor, y: Tensor, labels: Tensor | None) -> Tensor:
        """The output-space factor M_n of a Fisher kind (the engine's table, fisherlab.engine); shape (N, R, C).

        true: B_nᵀ (:meth:`fisher_factor`); empirical: ∇_z ℓ(z_n, y_n)ᵀ; ggn: K_nᵀ (:meth:`hessian_factor`);
        mc: the S rows ∇_z ℓ(z_n, ŷ_{n,s})ᵀ / √S for the sampled ``labels`` ŷ of shape (N, S, ...) (:meth:`sample`).
        """
        if kind is FisherKind.TRUE:
            return self.fisher_factor(z).transpose(-1, -2)
        if kind is FisherKind.EMPIRICAL:
            return self.grad_z(z, y).unsqueeze(1)
        if kind is FisherKind.GGN:
            return self.hessian_factor(z, y).transpose(-1, -2)
        if labels is None:
            raise InputError("kind='mc' needs the sampled labels")
        n, s = labels.shape[0], labels.shape[1]
        z_rep = z.unsqueeze(1).expand(n, s, z.shape[1]).reshape(n * s, -1)
        g = self.grad_z(z_rep, labels.reshape(n * s, *labels.shape[2:]))
        return g.reshape(n, s, -1) / math.sqrt(s)

    def hessian_factor(self, z: Tensor, y: Tensor) -> Tensor:
        """A factor H_n = K_n K_nᵀ of ∇²_z ℓ(z_n, y_n), by autograd and eigh; shape (N, C, C).

        Raises:
            InputError: If the Hessian has a clearly negative eigenvalue (the GGN of a non-convex loss).
        """

        def single(zi: Tensor, yi: Tensor) -> Tensor:
            return self.nll(zi.unsqueeze(0), yi.unsqueeze(0)).squeeze(0)

        hess = vmap(hessian(single))(z, y)
        evals, evecs = torch.linalg.eigh((hess + hess.transpose(-1, -2)) / 2)
        floor = -100 * torch.finfo(z.dtype).eps * evals.abs().amax().clamp_min(1.0)
        if bool((evals < floor).any()):
            raise InputError(f"the loss Hessian of likelihood {self.name!r} is not PSD; its GGN is not a metric")
        return evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)

    def grad_z_autograd(self, z: Tensor, y: Tensor) -> Tensor:
        """∇_z ℓ by autograd (an independent check of :meth:`grad_z`), shape (N, C)."""

        def single(zi: Tensor, yi: Tensor) -> Tensor:
            return self.nll(zi.unsqueeze(0), yi.unsqueeze(0)).squeeze(0)

        return vmap(grad(single))(z, y)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _check_outputs(z: Tensor) -> None:
    if z.dim() != 2:
        raise InputError(f"model outputs must have shape (N, C); got {tuple(z.shape)}")


def _check_same_shape(z: Tensor, y: Tensor, what: str) -> Tensor:
    if not y.is_floating_point():
        y = y.to(z.dtype)
    if y.dim() == 1 and z.shape[1] == 1:
        y = y.unsqueeze(1)
    if y.shape != z.shape:
        raise InputError(f"{what} targets must have the outputs' shape {tuple(z.shape)}; got {tuple(y.shape)}")
    return y.to(z.dtype)




class Categorical(Likelihood):
    """Categorical likelihood p = softmax(z); loss = cross-entropy; Λ(z) = diag(p) − p pᵀ.

    Args:
        ignore_index: For sequence outputs (N, T, C) (:class:`TokenLikelihood`), the label value of tokens that do
            not count (padding), as in ``nn.CrossEntropyLoss``; it must lie outside [0, C). Outputs (N, C) have no
            tokens to leave out: there every label must be a class.
    """

    name = "categorical"

    def __init__(self, ignore_index: int = IGNORE_INDEX):
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise InputError(f"ignore_index must be an integer label value; got {ignore_index!r}")
        self.ignore_index = int(ignore_index)

    def check_targets(self, z: Tensor, y: Tensor) -> Tensor:
        _check_outputs(z)
        if z.shape[1] < 2:
            raise InputError(
                f"the categorical likelihood needs C ≥ 2 outputs (one logit per class); the model has C = "
                f"{z.shape[1]}: the softmax of one logit is always 1, so its Fisher is zero. For two classes with one "
                "output use likelihood='bernoulli' (targets 0/1 of shape (N, 1)), or give the model 2 outputs"
            )
        if y.is_floating_point() or y.dtype == torch.bool:
            raise InputError(f"categorical targets must be integer class labels; got dtype {y.dtype}")
        if y.shape != z.shape[:1]:
            raise InputError(f"categorical targets must have shape (N,) = ({z.shape[0]},); got {tuple(y.shape)}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= z.shape[1]):
            hint = (f" (labels equal to ignore_index = {self.ignore_index} are left out only for sequence outputs "
                    "(N, T, C); with outputs (N, C) drop the sample instead)"
                    if bool((y == self.ignore_index).any()) else "")
            raise InputError(f"labels must lie in [0, {z.shape[1]}); got range [{int(y.min())}, {int(y.max())}]"
                             f"{hint}")
        return y.long()

    def nll(self, z: Tensor, y: Tensor) -> Tensor:
        return torch.logsumexp(z, dim=-1) - z.gather(-1, y.long().unsqueeze(-1)).squeeze(-1)

    def grad_z(self, z: Tensor, y: Tensor) -> Tensor:
        return torch.softmax(z, dim=-1) - nnf.one_hot(y.long(), z.shape[-1]).to(z.dtype)

    def fisher_factor(self, z: Tensor) -> Tensor:
        """B = diag(√p) H[:, :C−1], H the Householder reflection sending u = √p to −e_C (rank C − 1, exact).

        Λ = diag(√p)(I − u uᵀ)diag(√p) and the first C − 1 columns of H are an orthonormal basis of u⊥.
        w = u + e_C has ‖w‖² = 2(1 + u_C) ≥ 2, so the construction is stable for every p.
        """
        p = torch.softmax(z, dim=-1)
        u = p.sqrt()
        c = z.shape[-1]
        if c == 1:  # Λ = 0 (the engines refuse C = 1 in check_targets)
            return z.new_zeros(z.shape[0], 1, 1)
        w = u.clone()
        w[:, -1] += 1
        eye = torch.eye(c, dtype=z.dtype, device=z.device)
        house = eye - 2 * w.unsqueeze(-1) * w.unsqueeze(-2) / (w * w).sum(-1)[:, None, None]
        return u.unsqueeze(-1) * house[:, :, : c - 1]

    def fisher_apply(self, z: Tensor, w: Tensor) -> Tensor:
        p = torch.softmax(z, dim=-1)
        return p * w - p * (p * w).sum(-1, keepdim=True)

    def sample(self, z: Tensor, num_samples: int, generator: torch.Generator | None) -> Tensor:
        p = torch.softmax(z, dim=-1)
        return torch.multinomial(p, num_samples, replacement=True, generator=generator)

    def sample_pieces(self, z: Tensor, size: int, num_samples: int, generator: torch.Generator | None) -> Tensor:
        """The labels of :meth:`sample` piece by piece, bit for bit, with one softmax, division and argmax for all.

        For one sample torch's ``multinomial`` draws q ~ Exp(1) of the probabilities' shape and takes argmax p / q
        (the exponential race); only the draws are made piece by piece (1-thread minima, 512 × 10 logits in pieces
        of 29: 0.77–1.15 ms as ``sample`` per piece, 0.41–0.53 ms so; ``tests/test_likelihoods.py`` checks the bits
        on the CPU). Several samples, and other devices: :meth:`sample` per piece.
        """
        if num_samples != 1 or z.device.type != "cpu":
            return super().sample_pieces(z, size, num_samples, generator)
        p = torch.softmax(z, dim=-1)
        q = torch.cat([torch.empty_like(piece).exponential_(1, generator=generator) for piece in p.split(size)])
        return (p / q).argmax(-1, keepdim=True)

    def kl(self, z_p: Tensor, z_q: Tensor) -> Tensor:
        logp, logq = torch.log_softmax(z_p, -1), torch.log_softmax(z_q, -1)
        return (logp.exp() * (logp - logq)).sum(-1)

    def __repr__(self) -> str:
        if self.ignore_index == IGNORE_INDEX:
            return "Categorical()"
        return f"Categorical(ignore_index={self.ignore_index})"


class Gaussian(Likelihood):
    """Gaussian likelihood N(z, σ² I) with fixed σ; loss = ‖z − y‖² / (2σ²); Λ = I / σ²."""

    name = "gaussian"

    def __init__(self, sigma: float = 1.0):
        if not (sigma > 0 and math.isfinite(sigma)):
            raise InputError(f"Gaussian sigma must be positive and finite; got {sigma}")
        self.sigma = float(sigma)

    def check_targets(self, z: Tensor, y: Tensor) -> Tensor:
        _check_outputs(z)
        return _check_same_shape(z, y, "Gaussian")

    def nll(self, z: Tensor, y: Tensor) -> Tensor:
        return ((z - y) ** 2).sum(-1) / (2 * self.sigma**2)

    def grad_z(self, z: Tensor, y: Tensor) -> Tensor:
        return (z - y) / self.sigma**2

    def fisher_factor(self, z: Tensor) -> Tensor:
        eye = torch.eye(z.shape[-1], dtype=z.dtype, device=z.device) / self.sigma
        return eye.expand(z.shape[0], -1, -1)

    def fisher_apply(self, z: Tensor, w: Tensor) -> Tensor:
        return w / self.sigma**2

    def sample(self, z: Tensor, num_samples: int, generator: torch.Generator | None) -> Tensor:
        """Draw targets by Box–Muller on uniforms laid out sample by sample.

        Drawing a dataset in chunks then gives the same draws as drawing it at once (``torch.randn`` pairs its
        uniforms across samples in blocks of 16, so its draws depend on the chunking).
        """
        u = torch.rand((z.shape[0], num_samples, z.shape[1], 2), generator=generator, dtype=z.dtype,
                       device=z.device)
        noise = torch.sqrt(-2 * torch.log1p(-u[..., 0])) * torch.cos(2 * math.pi * u[..., 1])
        return z.unsqueeze(1) + self.sigma * noise

    def kl(self, z_p: Tensor, z_q: Tensor) -> Tensor:
        return ((z_p - z_q) ** 2).sum(-1) / (2 * self.sigma**2)

    def __repr__(self) -> str:
        return f"Gaussian(sigma={self.sigma})"


class Bernoulli(Likelihood):
    """Independent Bernoulli outputs p = sigmoid(z); loss = binary cross-entropy; Λ = diag(p (1 − p))."""

    name = "bernoulli"

    def check_targets(self, z: Tensor, y: Tensor) -> Tensor:
        _check_outputs(z)
        y = _check_same_shape(z, y, "Bernoulli")
        if y.numel() and not bool(((y == 0) | (y == 1)).all()):
            raise InputError("Bernoulli targets must be 0 or 1")
        return y

    def nll(self, z: Tensor, y: Tensor) -> Tensor:
        return nnf.binary_cross_entropy_with_logits(z, y, reduction="none").sum(-1)

    def grad_z(self, z: Tensor, y: Tensor) -> Tensor:
        return torch.sigmoid(z) - y

    def fisher_factor(self, z: Tensor) -> Tensor:
        p = torch.sigmoid(z)
        return torch.diag_embed((p * (1 - p)).sqrt())

    def fisher_apply(self, z: Tensor, w: Tensor) -> Tensor:
        p = torch.sigmoid(z)
        return p * (1 - p) * w

    def sample(self, z: Tensor, num_samples: int, generator: torch.Generator | None) -> Tensor:
        p = torch.sigmoid(z).unsqueeze(1).expand(-1, num_samples, -1)
        return torch.bernoulli(p, generator=generator)

    def kl(self, z_p: Tensor, z_q: Tensor) -> Tensor:
        p = torch.sigmoid(z_p)
        lp, lq = nnf.logsigmoid(z_p), nnf.logsigmoid(z_q)
        l1p, l1q = nnf.logsigmoid(-z_p), nnf.logsigmoid(-z_q)
        return (p * (lp - lq) + (1 - p) * (l1p - l1q)).sum(-1)


class TokenLikelihood(Likelihood):
    """A likelihood of sequences: ``base`` applied to each of the T tokens of the outputs, averaged over tokens.

    The engine flattens a sequence model's outputs (N, T, C) to z of shape (N, T·C), token-major
    (z[:, t·C:(t+1)·C] holds token t), and wraps the user's likelihood in this class (docs/sequences.md). With
    m_nt ∈ {0, 1} the token mask (0 where the label equals ``base.ignore_index``; every token counts for a
    likelihood without one, e.g. Gaussian and Bernoulli), N_tok = Σ_nt m_nt over all the data and c = N / N_tok:

    - per-sample loss ℓ̃_n = c Σ_t m_nt ℓ(z_nt, y_nt), so L = (1/N) Σ_n ℓ̃_n = (1/N_tok) Σ_nt m_nt ℓ_nt, the mean over
      the counted tokens (``nn.CrossEntropyLoss(ignore_index=…)`` on the flattened (N·T, C) logits, for one batch);
    - the output-space factors of every Fisher kind (:meth:`output_factor`) carry √(c m_nt) on the columns of token
      t, so (1/N) Σ_n J_nᵀ M_nᵀ M_n J_n averages over tokens as well. For ``true`` and ``ggn`` M_n is block-diagonal
      over the tokens (R = T·(C−1) rows for the categorical true Fisher, T·C for the GGN):
      F = (1/N_tok) Σ_n Σ_t m_nt J_ntᵀ Λ(z_nt) J_nt. For ``empirical`` and ``mc`` the rows are gradients of the whole
      sequence's loss, one per sequence (or per sequence and draw): g_n = Σ_t m_nt ∇θ ℓ_nt and
      F_emp = (1/N_tok) Σ_n g_n g_nᵀ; F_mc = (1/(N_tok S)) Σ_n Σ_s g_ns g_nsᵀ with labels drawn per token, unbiased
      for F because the tokens' draws are independent given z (the cross-token terms vanish in expectation).

    Every method takes the flattened z (n, T·C) and the canonical targets of :meth:`check_targets`: labels (n, T)
    (ignored tokens keep ``ignore_index``) or floats (n, T, C). :meth:`fisher_factor` and :meth:`sample` see no
    targets, so they count every token (the engine applies the mask through :meth:`output_factor`); :meth:`kl`
    and :meth:`fisher_apply` take the targets for the mask (without them, every token counts).

    Args:
        base: The likelihood of one token, outputs (n, C).
        seq_len: T, tokens per sequence.
        num_classes: C, outputs per token.
        num_sequences: N, sequences in the data (all ranks).
        num_tokens: N_tok, counted tokens in the data (all ranks); default N·T (nothing masked).

    Raises:
        InputError: ``base.ignore_index`` inside [0, C) (it would hide a class), no token counted, or counts that do
            not fit (N_tok > N·T).
    """

    #: Kinds whose factor is block-diagonal over the tokens (closed-form expectation, loss Hessian).
    BLOCK_KINDS = (FisherKind.TRUE, FisherKind.GGN)

    def __init__(self, base: Likelihood, seq_len: int, num_classes: int, *, num_sequences: int = 1,
                 num_tokens: int | None = None):
        if isinstance(base, TokenLikelihood):
            raise InputError("a TokenLikelihood takes the likelihood of one token, not another TokenLikelihood")
        self.base = base
        self.name = base.name  # type: ignore[misc]
        self.ggn_equals_fisher = base.ggn_equals_fisher  # type: ignore[misc]
        self.seq_len, self.num_classes = int(seq_len), int(num_classes)
        self.ignore_index: int | None = getattr(base, "ignore_index", None)
        if self.ignore_index is not None and 0 <= self.ignore_index < self.num_classes:
            raise InputError(f"ignore_index = {self.ignore_index} is a class label of outputs with C = "
                             f"{self.num_classes} classes per token; choose a value outside [0, {self.num_classes}) "
                             f"(torch's convention is {IGNORE_INDEX})")
        self.num_sequences = int(num_sequences)
        self.num_tokens = self.num_sequences * self.seq_len if num_tokens is None else int(num_tokens)
        if self.num_tokens < 1:
            raise InputError(f"every token of the {self.num_sequences} sequences is ignored (label "
                             f"{self.ignore_index}): there is no loss and no Fisher; check the labels and ignore_index")
        if self.num_tokens > self.num_sequences * self.seq_len:
            raise InputError(f"{self.num_tokens} counted tokens exceed N·T = {self.num_sequences}·{self.seq_len}")
        #: c = N / N_tok: per-sample sums over tokens times c average over tokens when divided by N.
        self.scale = self.num_sequences / self.num_tokens

    # ------------------------------------------------------------------------------------------ layout
    def _tokens(self, z: Tensor) -> Tensor:
        """Z (n, T·C) → (n·T, C)."""
        if z.dim() != 2 or z.shape[1] != self.seq_len * self.num_classes:
            raise InputError(f"expected flattened sequence outputs (n, T·C) = (n, {self.seq_len * self.num_classes});"
                             f" got {tuple(z.shape)}")
        return z.reshape(-1, self.num_classes)

    def token_mask(self, y: Tensor) -> Tensor:
        """M (n, T), True for the tokens that count, for canonical targets y."""
        if self.ignore_index is None:
            return torch.ones(y.shape[:2], dtype=torch.bool, device=y.device)
        return y != self.ignore_index

    def _token_targets(self, y: Tensor) -> Tensor:
        """Canonical targets (n, T, ...) → (n·T, ...) for ``base``, ignored labels replaced by class 0."""
        if self.ignore_index is not None:
            y = torch.where(y == self.ignore_index, torch.zeros_like(y), y)
        return y.reshape(-1, *y.shape[2:])

    def _weights(self, y: Tensor, dtype: torch.dtype) -> Tensor:
        """C m_nt, shape (n, T)."""
        return self.token_mask(y).to(dtype) * self.scale

    def _per_token(self, values: Tensor, n: int) -> Tensor:
        """(n·T, ...) → (n, T, ...)."""
        return values.unflatten(0, (n, self.seq_len))

    # ------------------------------------------------------------------------------------------ targets
    def check_targets(self, z: Tensor, y: Tensor) -> Tensor:
        """Labels (n, T) — integers in [0, C) or ``ignore_index`` — or targets (n, T, C) (or (n, T) when C = 1).

        Returns labels (n, T) int64 or floats (n, T, C).
        """
        n, T, C = z.shape[0], self.seq_len, self.num_classes
        z_tok = self._tokens(z)
        if self.ignore_index is not None:
            if y.is_floating_point() or y.dtype == torch.bool:
                raise InputError(f"{self.name} targets of a sequence model must be integer class labels of shape "
                                 f"(N, T) with T = {T}; got dtype {y.dtype}")
            if tuple(y.shape) != (n, T):
                raise InputError(f"{self.name} targets of a sequence model (outputs (N, T, C) with T = {T}, C = {C}) "
                                 f"must be class labels of shape (N, T); got {tuple(y.shape)} for {n} sequences")
            bad = (y != self.ignore_index) & ((y < 0) | (y >= C))
            if bool(bad.any()):
                i, t = (int(v) for v in bad.nonzero()[0])
                raise InputError(f"labels must lie in [0, {C}) or equal ignore_index = {self.ignore_index}; got "
                                 f"{int(y[i, t])} at position {t} of sequence {i} of the chunk")
            kept = self._check_tokens(z_tok, self._token_targets(y))
            return torch.where(y == self.ignore_index, y.long(), kept.reshape(n, T))
        if tuple(y.shape) not in ((n, T), (n, T, C)):
            raise InputError(f"{self.name} targets of a sequence model (outputs (N, T, C) with T = {T}, C = {C}) "
                             f"must have shape (N, T, C) (or (N, T) when C = 1); got {tuple(y.shape)} for {n} "
                             "sequences")
        kept = self._check_tokens(z_tok, y.reshape(n * T, *y.shape[2:]))
        return kept.reshape(n, T, *kept.shape[1:])

    def _check_tokens(self, z_tok: Tensor, y_tok: Tensor) -> Tensor:
        """``base.check_targets`` on the N·T tokens; its error says that it speaks of tokens."""
        try:
            return self.base.check_targets(z_tok, y_tok)
        except InputError as exc:
            raise InputError(f"{exc} (checked per token: the N·T tokens of a sequence model with T = "
                             f"{self.seq_len}, C = {self.num_classes})") from exc

    # ------------------------------------------------------------------------------------------ losses
    def nll(self, z: Tensor, y: Tensor) -> Tensor:
        """ℓ̃_n = c Σ_t m_nt ℓ(z_nt, y_nt), shape (n,)."""
        per_token = self._per_token(self.base.nll(self._tokens(z), self._token_targets(y)), z.shape[0])
        return (per_token * self._weights(y, z.dtype)).sum(-1)

    def grad_z(self, z: Tensor, y: Tensor) -> Tensor:
        """∇_z ℓ̃_n: c m_nt ∇ℓ(z_nt, y_nt) at the columns of token t, shape (n, T·C)."""
        g = self._per_token(self.base.grad_z(self._tokens(z), self._token_targets(y)), z.shape[0])
        return (g * self._weights(y, z.dtype).unsqueeze(-1)).reshape(z.shape)

    def kl(self, z_p: Tensor, z_q: Tensor, y: Tensor | None = None) -> Tensor:
        """C Σ_t m_nt KL(p(· | z_p,nt) ‖ p(· | z_q,nt)) per sequence, shape (n,), in nats.

        Its mean over the N sequences is the mean KL per counted token. ``y`` (canonical targets) gives the mask.

        Raises:
            InputError: ``y`` is None although the data has ignored tokens (their KL would be counted).
        """
        if y is None and self.num_tokens < self.num_sequences * self.seq_len:
            raise InputError("the KL of a sequence model with ignored tokens needs the targets (their mask): "
                             "call kl(z_p, z_q, y)")
        per_token = self._per_token(self.base.kl(self._tokens(z_p), self._tokens(z_q)), z_p.shape[0])
        weights = self.scale if y is None else self._weights(y, z_p.dtype)
        return (per_token * weights).sum(-1)

    # ------------------------------------------------------------------------------------------ Fisher factors
    def _block_diagonal(self, blocks: Tensor) -> Tensor:
        """Token blocks (n, T, a, b) → the block-diagonal matrices (n, T·a, T·b)."""
        n, T, a, b = blocks.shape
        eye = torch.eye(T, dtype=blocks.dtype, device=blocks.device)
        return torch.einsum("ntab,ts->ntasb", blocks, eye).reshape(n, T * a, T * b)

    def fisher_factor(self, z: Tensor) -> Tensor:
        """B_n with B_n B_nᵀ = c · blockdiag_t Λ(z_nt), every token counted; shape (n, T·C, T·R)."""
        B = self._per_token(self.base.fisher_factor(self._tokens(z)), z.shape[0])
        return self._block_diagonal(B * math.sqrt(self.scale))

    def fisher_apply(self, z: Tensor, w: Tensor, y: Tensor | None = None) -> Tensor:
        """The products c m_nt Λ(z_nt) w_nt of every token, w of shape (n, T·C); returns (n, T·C).

        ``y`` (canonical targets) gives the mask m; without it every token counts (m = 1).
        """
        out = self.base.fisher_apply(self._tokens(z), self._tokens(w))
        if y is None:
            return self.scale * out.reshape(z.shape)
        return (self._per_token(out, z.shape[0]) * self._weights(y, z.dtype).unsqueeze(-1)).reshape(z.shape)

    def hessian_factor(self, z: Tensor, y: Tensor) -> Tensor:
        """K_n with K_n K_nᵀ = ∇²_z ℓ̃_n = blockdiag_t c m_nt ∇²ℓ(z_nt, y_nt); shape (n, T·C, T·C)."""
        K = self._per_token(self.base.hessian_factor(self._tokens(z), self._token_targets(y)), z.shape[0])
        return self._block_diagonal(K * self._weights(y, z.dtype).sqrt()[..., None, None])

    def token_factor(self, kind: FisherKind, z: Tensor, y: Tensor, labels: Tensor | None) -> Tensor:
        """The base likelihood's factor rows of every token times √(c m_nt), shape (n, T, R, C).

        ``labels``: the MC draws (n, S, T, ...) of :meth:`sample`.
        """
        n = z.shape[0]
        token_labels = None if labels is None else labels.movedim(2, 1).flatten(0, 1)
        M = self._per_token(self.base.output_factor(kind, self._tokens(z), self._token_targets(y), token_labels), n)
        return M * self._weights(y, z.dtype).sqrt()[..., None, None]

    def output_factor(self, kind: FisherKind, z: Tensor, y: Tensor, labels: Tensor | None) -> Tensor:
        """M_n (n, R, T·C) of a Fisher kind, from the token rows of :meth:`token_factor`.

        Block-diagonal over tokens for ``true`` / ``ggn`` (R = T·R_token); for ``empirical`` (one row per sequence)
        and ``mc`` (one per sequence and draw) the columns of token t hold that token's row (the class docstring).
        """
        M = self.token_factor(kind, z, y, labels)
        if kind in self.BLOCK_KINDS:
            return self._block_diagonal(M)
        return M.transpose(1, 2).reshape(z.shape[0], M.shape[2], -1)

    # ------------------------------------------------------------------------------------------ sampling
    def sample(self, z: Tensor, num_samples: int, generator: torch.Generator | None) -> Tensor:
        """Targets drawn per token, independently: (n, S, T) labels or (n, S, T, C) (every token draws)."""
        draws = self._per_token(self.base.sample(self._tokens(z), num_samples, generator), z.shape[0])
        return draws.movedim(2, 1)

    def __repr__(self) -> str:
        return (f"TokenLikelihood({self.base!r}, seq_len={self.seq_len}, num_classes={self.num_classes}, "
                f"num_sequences={self.num_sequences}, num_tokens={self.num_tokens})")


LIKELIHOODS: dict[str, type[Likelihood]] = {c.name: c for c in (Categorical, Gaussian, Bernoulli)}


def register(cls: type[Likelihood]) -> type[Likelihood]:
    """Register a user-defined :class:`Likelihood` subclass under ``cls.name`` (usable as a decorator)."""
    if not cls.name:
        raise InputError("a likelihood class needs a non-empty `name`")
    LIKELIHOODS[cls.name] = cls
    return cls


def get_likelihood(spec: str | Likelihood, **kwargs: float | int) -> Likelihood:
    """Resolve a likelihood from its name (``"categorical"``, ``"gaussian"``, ``"bernoulli"``) or pass one through.

    Raises:
        InputError: For an unknown name (the message lists the valid ones).
    """
    if isinstance(spec, Likelihood):
        return spec
    if spec not in LIKELIHOODS:
        raise InputError(f"unsupported likelihood {spec!r}; valid: {sorted(LIKELIHOODS)}")
    return LIKELIHOODS[spec](**kwargs)
