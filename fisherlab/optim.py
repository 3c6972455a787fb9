"""Optimizers for the user's own training loop: structured NGD by the reconstructed-network method.

:class:`SNGD` is a ``torch.optim.Optimizer`` (``step(closure=None)``, ``zero_grad``, ``state_dict`` /
``load_state_dict``, learning-rate schedulers) that trains the user's model as plain gradient descent on its
reconstructed network (:func:`fisherlab.reconstruct`, METHOD.md §4) would: one GD step on θ' = Rθ (RᵀR = G, G the
structured Fisher plus damping) moves θ by

    Δθ = R⁻¹ (−η ∇θ' L) = −η R⁻¹ R⁻ᵀ ∇θ L = −η G⁻¹ ∇θ L,

so SNGD applies that step to the model's own parameters from the gradients ``loss.backward()`` left in ``.grad``.
G is computed at construction on ``data`` (at the model's parameters then) and recomputed (refreshed) at the
current parameters before every ``refresh_every``-th step, on the step's ``batch`` when one is given (as
:func:`fisherlab.train.train` does with ``rule="sngd"``: its trajectory is reproduced to round-off) or else on
``data``. The step costs one product G⁻¹∇L with the roots of G (per Kronecker layer about three times dense K-FAC's
S⁻¹∇W̄A⁻¹), and a refresh costs what :meth:`~fisherlab.reconstruction.ReconstructedNetwork.refresh` costs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from fisherlab.checks import check_damping, check_lr, check_positive_int
from fisherlab.errors import InputError
from fisherlab.likelihoods import Likelihood
from fisherlab.params import ParamSpec

__all__ = ["SNGD"]


class SNGD(torch.optim.Optimizer):
    """Structured NGD: θ ← θ − η G⁻¹ ∇L with G the reconstructed network's metric (module docstring).

    Args:
        model: The model to train (its parameters are updated in place; the model is not otherwise changed). In
            eval mode if it has dropout or batch norm. Its trainable parameters form one param group.
        data: The samples G is computed on at construction and at refreshes without a ``batch``: ``(X, y)``, a
            SplitData (training split) or a DataLoader (all of its batches).
        likelihood: Likelihood name or object.
        lr: Learning rate η.
        structure: Reconstruction structure of G (``"kfac"``, ``"block"``, ``"dense"``, ``"diag"``, ...).
        damping: λ.
        refresh_every: Recompute G before every this many steps (step k refreshes when k % refresh_every == 0,
            k > 0; the G of step 0 is the one computed at construction).
        kind: Fisher kind of G.
        seed: Seed of Monte-Carlo labels (refresh k uses ``seed + k``).
        **reconstruct_options: Further options of :func:`fisherlab.reconstruct` (``sqrt``, ``ema_decay``,
            ``split``, ``fold``, ``mc_samples``, ``chunk_size``, ...).

    Attributes:
        network: The :class:`~fisherlab.reconstruction.ReconstructedNetwork` holding the roots of G (a copy of the
            model; its own parameters are not used).
        steps: Steps taken.

    Raises:
        InputError: Bad options (those of :func:`fisherlab.reconstruct` too), ``inplace=``, or a model without
            trainable parameters.
        UnsupportedLayerError, SingularMatrixError, MemoryBudgetError: As :func:`fisherlab.reconstruct`.
    """

    def __init__(self, model: nn.Module, data: Any, likelihood: str | Likelihood = "categorical", *, lr: float,
                 structure: str = "kfac", damping: float = 1e-3, refresh_every: int = 10, kind: str = "true",
                 seed: int = 0, **reconstruct_options: Any):
        from fisherlab.reconstruction import reconstruct

        if not isinstance(model, nn.Module):
            raise InputError(f"model must be an nn.Module; got {type(model)}")
        if "inplace" in reconstruct_options:
            raise InputError("SNGD keeps its reconstructed network beside the model: inplace= is not an option")
        spec = ParamSpec.from_model(model)
        named = dict(model.named_parameters())
        super().__init__([named[n] for n in spec.names], {"lr": check_lr(lr)})
        self.spec = spec
        self.refresh_every = check_positive_int(refresh_every, "refresh_every")
        self.data = data
        self.network = reconstruct(model, data, likelihood, structure=structure, damping=check_damping(damping),
                                   kind=kind, seed=seed, **reconstruct_options)
        self.steps = 0

    # ------------------------------------------------------------------------------------------ state
    @property
    def steps_since_refresh(self) -> int:
        """Steps taken since G was last computed."""
        return self.network.steps_since_refresh

    def _params(self) -> list[Tensor]:
        return self.param_groups[0]["params"]

    def _theta(self) -> Tensor:
        """θ (P,) in ParamSpec order, detached."""
        return self.spec.flatten([p.detach() for p in self._params()])

    def refresh(self, data: Any = None) -> None:
        """Recompute G at the current parameters on ``data`` (default: the construction data)."""
        with torch.no_grad():
            self.network.load_original(self._theta())
        self.network.refresh(self.data if data is None else data)

    def direction(self, grad: Tensor) -> Tensor:
        """G⁻¹ ∇L (P,) for a gradient (P,): R⁻¹ (R⁻ᵀ ∇L), R⁻ᵀ by a vector-Jacobian product of the linear map R⁻¹."""
        net = self.network
        with torch.enable_grad():
            z = torch.zeros_like(grad, requires_grad=True)
            (prime,) = torch.autograd.grad(net.to_original_update(z), z, grad_outputs=grad.to(z))
        with torch.no_grad():
            return net.to_original_update(prime)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None, *, batch: Any = None) -> Tensor | None:
        """One SNGD step from the parameters' ``.grad`` (after ``closure()``, which re-evaluates the loss, if given).

        Args:
            closure: Optional: computes the loss and its gradients (``loss.backward()``) and returns the loss.
            batch: The step's minibatch ``(x, y)``: when a refresh is due, G is computed on it (else on ``data``).

        Returns:
            The closure's loss, or None.

        Raises:
            InputError: When some parameters have a gradient and others none (all None: no step, as torch's
                optimizers skip such parameters).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._params()
        missing = [n for n, p in zip(self.spec.names, params, strict=True) if p.grad is None]
        if len(missing) == len(params):
            return loss
        if missing:
            raise InputError(f"SNGD preconditions all parameters together; {missing} have no gradient")
        if any(p.grad.is_sparse for p in params):
            raise InputError("SNGD needs dense gradients (an nn.Embedding with sparse=True gives sparse ones)")
        if self.steps > 0 and self.steps % self.refresh_every == 0:
            self.refresh(batch)
        grad = self.spec.flatten([p.grad for p in params])
        update = self.direction(grad)
        lr = self.param_groups[0]["lr"]
        for p, d in zip(params, self.spec.unflatten(update).values(), strict=True):
            p.add_(d.to(p), alpha=-lr)
        self.steps += 1
        self.network.count_step()
        return loss

    # ------------------------------------------------------------------------------------- state dict
    def _network_state(self) -> dict[str, Any]:
        net = self.network
        buffers = {f"{path}:{name}": None if b is None else b.detach().clone()
                   for path, module in net.named_modules() for name, b in module._buffers.items()}
        return {"steps": self.steps, "refreshes": net.refreshes, "steps_since_refresh": net.steps_since_refresh,
                "buffers": buffers,
                "statistics": {k: {s: v.clone() for s, v in d.items()} for k, d in net._stats.items()}}

    def state_dict(self) -> dict[str, Any]:
        """The ``state`` and ``param_groups`` of torch's optimizers, plus ``"sngd"``.

        ``"sngd"`` holds the step counters, the roots of G (the network's buffers) and the statistics of a
        moving average: everything a fresh SNGD needs to continue exactly.
        """
        out = super().state_dict()
        out["sngd"] = self._network_state()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` returned (into an SNGD built the same way, e.g. on the same model class).

        Raises:
            InputError: A state dict without the ``"sngd"`` entry, or of a network with other roots.
        """
        if not isinstance(state_dict, dict) or "sngd" not in state_dict:
            raise InputError("not an SNGD state dict (no 'sngd' entry)")
        rest = {k: v for k, v in state_dict.items() if k != "sngd"}
        saved = state_dict["sngd"]
        net = self.network
        first = self._params()[0]
        net.to(device=first.device, dtype=first.dtype)
        modules = dict(net.named_modules())
        mine = {f"{path}:{name}" for path, module in modules.items() for name in module._buffers}
        if mine != set(saved["buffers"]):
            raise InputError(f"the state dict holds the roots of another network (buffers "
                             f"{sorted(set(saved['buffers']) ^ mine)[:5]} differ)")
        super().load_state_dict(rest)
        for key, value in saved["buffers"].items():
            path, name = key.rsplit(":", 1)
            module = modules[path]
            old = module._buffers[name]
            like = old if old is not None else first
            module._buffers[name] = None if value is None else value.detach().clone().to(like.device, like.dtype)
        net.refreshes, net.steps_since_refresh = int(saved["refreshes"]), int(saved["steps_since_refresh"])
        net._stats = {k: {s: v.clone() for s, v in d.items()} for k, d in saved["statistics"].items()}
        self.steps = int(saved["steps"])

    def __deepcopy__(self, memo: dict) -> SNGD:
        """A copy with its own network and state; ``data`` is shared, not copied."""
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            if k != "step":  # a learning-rate scheduler's wrapper of the original's step stays with the original
                new.__dict__[k] = v if k == "data" else copy.deepcopy(v, memo)
        return new

    def __repr__(self) -> str:
        c = self.network.config
        return (f"SNGD(lr={self.param_groups[0]['lr']:g}, structure={c.structure!r}, damping={c.damping:g}, "
                f"refresh_every={self.refresh_every}, steps={self.steps})")
