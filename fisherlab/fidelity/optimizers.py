"""Optimizers as update rules: the update a ``torch.optim`` optimizer takes, measured by a dry run.

An :class:`OptimizerRule` turns any optimizer — a ``torch.optim.Optimizer`` instance, or a factory
``params -> Optimizer`` — into an update rule (:class:`~fisherlab.fidelity.rules.Rule`): at a
:class:`~fisherlab.fidelity.rules.RuleContext` its update Δθ (P,) is what one real ``step()`` of the optimizer
does to the parameters, in the original coordinates (:class:`~fisherlab.params.ParamSpec` order), so it can be
compared with exact NGD like any built-in rule (:func:`fisherlab.evaluate_fidelity`,
:func:`fisherlab.fidelity_trajectory`, :class:`~fisherlab.fidelity.trajectory.FidelityProbe`).

**The dry run** (:func:`dry_run`). The gradient of the step is the context's ∇L (the batch gradient every rule
uses; an optimizer that needs a closure, such as LBFGS, gets one that re-evaluates L and ∇L on the context's
batch at the current parameters). Before the step the parameters are swapped for copies (``p.data``), the
optimizer's state for copies (a standard optimizer: ``state`` and ``param_groups`` with every tensor cloned;
one that overrides ``state_dict``: a deep copy of ``state_dict()``), and the random number generators (torch,
NumPy, Python) are saved; the step runs with the optimizer's step hooks switched off (hooks observe training,
not measurements); Δθ = θ_after − θ_before is read; then parameters, gradients, state, ``param_groups``
(learning rates set by schedules, counters an optimizer keeps there), plain scalar attributes and the
generators are put back — the original tensor objects, so nothing an optimizer does next can tell that it was
measured (tested bitwise). Δθ uses the optimizer's own learning rate(s), param groups, weight decay and
whatever schedule has set ``lr``; it is exact up to the rounding of θ + Δθ (|error| ≤ ε|θ| per entry).

**Which parameters.** A bound optimizer (an instance) must hold every trainable parameter of the model it is
measured on — an optimizer over other tensors, or over only some of the trainable ones, is refused
(:class:`~fisherlab.errors.InputError` naming them): freeze the others (``requires_grad_(False)``), which
leaves them out of θ (their update is zero by definition). Sparse gradients (``nn.Embedding(sparse=True)``,
``torch.optim.SparseAdam``) are refused; an optimizer whose step raises is reported as an ``InputError`` whose
cause is the optimizer's exception (its state is restored first).

**Scale.** Cosines (``cosine``, ``cosine_layer``) do not depend on the length of Δθ; every other metric does
(each metric variable carries the attribute ``scale_dependent``). A user's optimizer steps with its own
learning rate while exact NGD uses the measurement's η, so compare their scale-dependent metrics knowingly; the
built-in optimizer rules below are built with the measurement's η (``takes_lr=True``).

**Built-in optimizer rules** (:data:`OPTIMIZER_RULES`, registered in :data:`~fisherlab.fidelity.rules.RULES`;
lr = the measurement's η; state after ``warmup`` = 10 steps from the current state on the same batch, on a copy,
parameters then reset to θ so that the measured step starts at θ with the warm state):

===============  ==============================================================================================
``momentum``     ``torch.optim.SGD(momentum=0.9)``
``nesterov``     ``torch.optim.SGD(momentum=0.9, nesterov=True)``
``adam-warm``    ``torch.optim.Adam`` (the rule ``adam`` is its first step from zero moments)
``adamw``        ``torch.optim.AdamW`` (weight decay 0.01)
``adagrad``      ``torch.optim.Adagrad``
``rmsprop``      ``torch.optim.RMSprop``
``adafactor``    ``torch.optim.Adafactor`` (where the installed torch has it)
``muon``         :class:`MuonWithAdamW`: ``torch.optim.Muon`` on weight matrices, AdamW on the rest (where the
                 installed torch has Muon)
``shampoo``      ``pytorch_optimizer.Shampoo``  — optional extra ``pip install 'fisherlab[optimizers]'``
``soap``         ``pytorch_optimizer.SOAP``     — optional extra
``psgd-kron``    ``pytorch_optimizer.Kron`` (PSGD-Kron) — optional extra
===============  ==============================================================================================

:func:`optimizer_rules` says which are available here; using one whose library is missing raises an
``InputError`` that says what to install.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import random
import weakref
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fisherlab.checks import check_positive_int
from fisherlab.errors import FisherlabError, InputError
from fisherlab.fidelity.rules import Rule, RuleContext, register_rule
from fisherlab.params import ParamSpec

#: A factory of optimizers: ``factory(params)`` (or ``factory(params, lr=η)`` for ``takes_lr`` rules).
OptimizerFactory = Callable[..., torch.optim.Optimizer]

#: Extra that installs the optional optimizer library.
EXTRA_HINT = "pip install 'fisherlab[optimizers]' (or pip install pytorch-optimizer)"

#: Warm-up steps of the built-in optimizer rules.
DEFAULT_WARMUP = 10

_SCALARS = (bool, int, float, str, type(None))


# ------------------------------------------------------------------------------------------ inspection
def optimizer_name(optimizer: Any) -> str:
    """``"optimizer:<Class>"`` for an optimizer instance, class, ``functools.partial`` or named factory.

    Raises:
        InputError: For a factory without a usable name (a lambda): name the rule yourself.
    """
    if isinstance(optimizer, OptimizerRule):
        return optimizer.name
    target = optimizer.func if isinstance(optimizer, functools.partial) else optimizer
    if not isinstance(target, type) and hasattr(target, "param_groups"):
        target = type(target)
    name = getattr(target, "__name__", "")
    if not name or name == "<lambda>":
        raise InputError(f"cannot name the optimizer factory {optimizer!r}: wrap it as "
                         "OptimizerRule('my-name', factory)")
    return f"optimizer:{name}"


def step_parameters(optimizer: Any) -> list[inspect.Parameter]:
    """The parameters of ``optimizer.step`` after ``self``."""
    try:
        signature = inspect.signature(type(optimizer).step)
    except (TypeError, ValueError):  # a builtin or an odd callable: assume the usual step(closure=None)
        return [inspect.Parameter("closure", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)]
    return list(signature.parameters.values())[1:]


def needs_closure(optimizer: Any) -> bool:
    """Whether ``optimizer.step`` requires a closure (its first argument has no default, as LBFGS's)."""
    params = step_parameters(optimizer)
    return bool(params) and params[0].default is inspect.Parameter.empty and params[0].kind in (
        inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def check_optimizer(optimizer: Any, what: str = "optimizer") -> None:
    """Refuse an object that is not an optimizer, or one that needs sparse gradients."""
    missing = [a for a in ("param_groups", "step", "state_dict", "load_state_dict") if not hasattr(optimizer, a)]
    if missing:
        raise InputError(f"{what} must be a torch.optim.Optimizer (or have {missing}); got {type(optimizer)}")
    if isinstance(optimizer, torch.optim.SparseAdam):
        raise InputError(f"{what}: torch.optim.SparseAdam steps on sparse gradients, which fisherlab does not "
                         "support (every update is a dense vector (P,)); use Adam or AdamW")


def check_dense_gradients(model: nn.Module) -> None:
    """Refuse a model whose backward pass produces sparse gradients (``nn.Embedding(sparse=True)``)."""
    sparse = [n for n, m in model.named_modules() if getattr(m, "sparse", False) is True]
    if sparse:
        raise InputError(f"modules {sparse} produce sparse gradients (sparse=True), which fisherlab does not "
                         "support: construct them with sparse=False")


def held_parameters(optimizer: Any) -> list[Tensor]:
    """The tensors an optimizer updates, in param-group order (each once)."""
    seen: dict[int, Tensor] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            seen.setdefault(id(p), p)
    return list(seen.values())


def check_binding(optimizer: Any, model: nn.Module, spec: ParamSpec) -> None:
    """Refuse an optimizer that holds tensors that are not ``model``'s, or misses one of its trainable ones.

    Raises:
        InputError: Naming the foreign tensors (by shape) or the trainable parameters not in the optimizer.
    """
    named = dict(model.named_parameters())
    by_id = {id(p): n for n, p in named.items()}
    held = held_parameters(optimizer)
    foreign = [tuple(p.shape) for p in held if id(p) not in by_id]
    if foreign:
        raise InputError(f"the optimizer holds {len(foreign)} tensor(s) that are not parameters of the model "
                         f"(shapes {foreign[:5]}{' ...' if len(foreign) > 5 else ''}); build it over "
                         "model.parameters() (fidelity_trajectory and the probe measure the model they are given)")
    held_ids = {id(p) for p in held}
    missing = [n for n in spec.names if id(named[n]) not in held_ids]
    if missing:
        raise InputError(f"trainable parameters {missing} are not in the optimizer: add them, or freeze them "
                         "(p.requires_grad_(False)) so that they are no part of θ")


def build_optimizer(factory: OptimizerFactory, params: list[Tensor], lr: float | None = None,
                    name: str = "the optimizer") -> Any:
    """``factory(params)`` (``factory(params, lr=lr)`` when ``lr`` is given), checked to be an optimizer.

    Raises:
        InputError: When the factory raises (its exception is the cause) or returns something else.
    """
    try:
        optimizer = factory(params) if lr is None else factory(params, lr=lr)
    except FisherlabError:
        raise
    except Exception as exc:
        raise InputError(f"the optimizer factory of {name} failed: {type(exc).__name__}: {exc}") from exc
    check_optimizer(optimizer, f"the factory of {name}")
    return optimizer


# ------------------------------------------------------------------------------------------- dry runs
class Scratch:
    """Buffers a dry run copies into, kept between dry runs of one optimizer so that they allocate little.

    Fresh multi-megabyte buffers cost the kernel's page faults and zeroing on every dry run (about two more
    passes over each); reused ones cost the copy only. Holds a copy of the optimizer's state tensors (after a
    dry run: its discarded results) and, where the gradient is copied, of ∇L. Only Δθ, the result, is new.
    """

    def __init__(self) -> None:
        self.buffers: dict[Any, Tensor] = {}

    def like(self, key: Any, tensor: Tensor) -> Tensor:
        """A buffer of ``tensor``'s shape, dtype and device (reused when they match)."""
        buf = self.buffers.get(key)
        if buf is None or buf.shape != tensor.shape or buf.dtype != tensor.dtype or buf.device != tensor.device:
            buf = self.buffers[key] = torch.empty_like(tensor, memory_format=torch.preserve_format)
        return buf

    def flat(self, key: Any, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A contiguous buffer (numel,)."""
        buf = self.buffers.get(key)
        if buf is None or buf.numel() != numel or buf.dtype != dtype or buf.device != device:
            buf = self.buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf


def _clone(value: Any, scratch: Scratch | None = None, key: Any = None) -> Any:
    """A copy of an optimizer-state value: tensors (into ``scratch`` buffers), containers, other objects (deep)."""
    if isinstance(value, Tensor):
        if scratch is None or key is None:
            return value.clone()
        return scratch.like(key, value).copy_(value)
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v, scratch, None if key is None else (*key, i)) for i, v in enumerate(value))
    if isinstance(value, dict):
        return {k: _clone(v, scratch, None if key is None else (*key, k)) for k, v in value.items()}
    return copy.deepcopy(value)


def _standard_state(optimizer: Any) -> bool:
    """Whether the optimizer's whole state is ``state`` and ``param_groups`` (``state_dict`` not overridden).

    Such a state is restored by putting the original objects back, never through ``load_state_dict`` (which
    casts floating state to the parameters' dtype: a float32 preconditioner of float64 parameters would change).
    """
    return (isinstance(optimizer, torch.optim.Optimizer)
            and type(optimizer).state_dict is torch.optim.Optimizer.state_dict)


@contextmanager
def _quiet_hooks(optimizer: Any) -> Iterator[None]:
    """Switch off the optimizer's step hooks and torch's global ones inside the block."""
    from torch.optim import optimizer as torch_optimizer

    local = [a for a in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks") if hasattr(optimizer, a)]
    saved_local = {a: getattr(optimizer, a) for a in local}
    glob = [a for a in ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks")
            if hasattr(torch_optimizer, a)]
    saved_glob = {a: getattr(torch_optimizer, a) for a in glob}
    for a in local:
        setattr(optimizer, a, OrderedDict())
    for a in glob:
        setattr(torch_optimizer, a, OrderedDict())
    try:
        yield
    finally:
        for a, v in saved_local.items():
            setattr(optimizer, a, v)
        for a, v in saved_glob.items():
            setattr(torch_optimizer, a, v)


@contextmanager
def isolated_rng(devices: Iterable[torch.device] = ()) -> Iterator[None]:
    """Restore torch's (CPU and the given CUDA devices'), NumPy's and Python's global generators afterwards."""
    cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"})
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


@contextmanager
def _restored_state(optimizer: Any, scratch: Scratch | None = None) -> Iterator[None]:
    """Run the block on copies of the optimizer's state, then put the original state objects back."""
    attrs = {k: v for k, v in vars(optimizer).items() if isinstance(v, _SCALARS)}
    standard = _standard_state(optimizer)
    if standard:
        state, groups = optimizer.state, optimizer.param_groups
        optimizer.state = defaultdict(dict, {p: _clone(s, scratch, ("state", id(p))) for p, s in state.items()})
        optimizer.param_groups = [{k: v if k == "params" else _clone(v) for k, v in g.items()} for g in groups]
    else:
        saved = copy.deepcopy(optimizer.state_dict())
    try:
        yield
    finally:
        if standard:
            optimizer.state, optimizer.param_groups = state, groups
        else:
            optimizer.load_state_dict(saved)
        for k in [k for k, v in vars(optimizer).items() if k not in attrs and isinstance(v, _SCALARS)]:
            delattr(optimizer, k)
        for k, v in attrs.items():
            setattr(optimizer, k, v)


def _call_step(optimizer: Any, closure: Callable[[], Tensor] | None, name: str) -> None:
    """``optimizer.step(closure)`` (or ``step()``), a failure re-raised as an InputError with its cause."""
    try:
        if closure is None:
            optimizer.step()
        else:
            optimizer.step(closure)
    except FisherlabError:
        raise
    except Exception as exc:
        raise InputError(f"the step of {name} failed: {type(exc).__name__}: {exc}") from exc


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def dry_run(optimizer: Any, model: nn.Module, spec: ParamSpec, grad: Tensor,
            closure: Callable[[], Tensor] | None, *, name: str = "the optimizer", restore: bool = True,
            scratch: Scratch | None = None, copy_grad: bool = True) -> Tensor:
    """Δθ (P,) of one ``optimizer.step`` at the model's parameters with gradient ``grad`` (P,).

    Args:
        optimizer: An optimizer over ``model``'s trainable parameters (:func:`check_binding`).
        model: The model; its parameters are θ.
        spec: The parameter order of θ and Δθ (the model's trainable parameters).
        grad: ∇L (P,), set as the parameters' ``.grad`` (a copy, unless ``copy_grad`` is False: the optimizer may
            change its ``.grad`` in place).
        closure: Passed to ``step`` (for optimizers that need one), else None.
        name: The optimizer's name in error messages.
        restore: Put parameters, gradients, the optimizer's state and the random generators back afterwards
            (a measurement); with False the step is a real training step.
        scratch: Buffers to copy into, reused from one dry run to the next (default: fresh ones).
        copy_grad: Give the optimizer a copy of ``grad`` (False: views of ``grad`` itself, for a caller that
            checks ``grad._version`` afterwards and repairs it if the step changed it).

    Returns:
        θ_after − θ_before in ``spec`` order (a new tensor), in the parameters' dtype.
    """
    scratch = Scratch() if scratch is None else scratch
    named = dict(model.named_parameters())
    params = [named[n] for n in spec.names]
    others = [p for p in held_parameters(optimizer) if all(p is not q for q in params)]
    dtype, device = params[0].dtype, params[0].device
    uniform = all(p.dtype == dtype and p.device == device for p in params)
    # Δθ's vector first holds a copy of θ, which the step moves (restore) or which is θ_before (no restore)
    delta = torch.empty(spec.dim, dtype=dtype, device=device) if uniform else None
    if not copy_grad and grad.dtype == dtype and grad.device == device:
        g = grad.detach()
    else:
        g = scratch.flat("grad", spec.dim, dtype, device).copy_(grad) if uniform else grad.detach().clone()
    saved_grads = [p.grad for p in params + others]
    slices = [slice(a, b) for a, b in zip(spec.offsets[:-1], spec.offsets[1:], strict=True)]
    copies, originals = [], []
    with torch.no_grad():
        for p, sl in zip(params, slices, strict=True):
            here = delta[sl].view(p.shape) if uniform else torch.empty_like(p, memory_format=torch.contiguous_format)
            here.copy_(p)
            originals.append(p.data)
            copies.append(here)
            if restore:
                p.data = here  # the step moves the copy; the original θ stays where the model had it
            p.grad = g[sl].view(p.shape).to(p.dtype)
        frozen = [p.data for p in others]  # tensors the optimizer holds beyond θ (frozen): run on copies too
        if restore:
            for p in others:
                p.data = scratch.like(("frozen", id(p)), p.data).copy_(p.data)
    try:
        with _quiet_hooks(optimizer) if restore else _nothing(), \
                isolated_rng([device]) if restore else _nothing(), \
                _restored_state(optimizer, scratch) if restore else _nothing():
            _call_step(optimizer, closure, name)
            with torch.no_grad():
                for p, here, orig in zip(params, copies, originals, strict=True):
                    if not restore:
                        torch.sub(p.data, here, out=here)  # θ_after − θ_before
                    elif p.data.data_ptr() == here.data_ptr():
                        here.sub_(orig)  # the step moved the copy in place
                    else:  # the optimizer replaced p.data
                        torch.sub(p.data, orig, out=here)
    finally:
        if restore:
            with torch.no_grad():
                for p, orig in zip(params, originals, strict=True):
                    p.data = orig
                for p, orig in zip(others, frozen, strict=True):
                    p.data = orig
            for p, saved in zip(params + others, saved_grads, strict=True):
                p.grad = saved
    return delta if uniform else torch.cat([d.reshape(-1) for d in copies])


def loss_closure(model: nn.Module, ctx: RuleContext) -> Callable[[], Tensor]:
    """A closure for ``step``: L and ∇L on the context's batch at the model's current parameters (sets ``.grad``).

    ∇L comes from the context's engine (:meth:`~fisherlab.engine.FisherEngine.loss_and_gradient`), so that at
    θ it is bit for bit the context's gradient.
    """
    engine = ctx.engine()
    spec = engine.spec

    def closure() -> Tensor:
        named = dict(model.named_parameters())
        params = {n: named[n].detach().to(engine.device, engine.dtype) for n in spec.names}
        loss, g = engine.loss_and_gradient(params)
        for n, gi in spec.unflatten(g).items():
            named[n].grad = gi.to(named[n].device, named[n].dtype)
        return loss

    return closure


# ------------------------------------------------------------------------------------------------ rule
class OptimizerRule(Rule):
    """An optimizer as an update rule: the Δθ of one real ``step()``, measured by a dry run (module docstring).

    Args:
        name: The rule's name (None: ``"optimizer:<Class>"``).
        optimizer: Either an optimizer **instance** (bound: measured in place on the model whose parameters it
            holds, with its current state — the state it has in its own training; parameters and state are
            restored), or a **factory** ``params -> Optimizer`` (called on a copy of the context's model at
            each measured state, warmed up ``warmup`` steps, then measured; nothing to restore).
        warmup: Factory only: optimizer steps taken before the measured one, on the same batch from the current
            state (each at the moved parameters); the parameters are then reset to θ, keeping the state, and
            the measured step starts at θ.
        closure: Pass a closure to ``step``: None (default) when ``step`` requires one (LBFGS), True always,
            False never (refused for an optimizer that requires one).
        takes_lr: Factory only: call ``factory(params, lr=η)`` with the measurement's learning rate η (the
            built-in rules), else the optimizer's own learning rate is used.
        requires: A module the factory imports (an optional library): the rule is unavailable without it.

    Raises:
        InputError: An object that is not an optimizer or factory, SparseAdam, a negative warm-up, warm-up or
            ``takes_lr`` with an instance, or ``closure=False`` for an optimizer whose step requires one.
    """

    def __init__(self, name: str | None, optimizer: Any, *, warmup: int = 0, closure: bool | None = None,
                 takes_lr: bool = False, requires: str | None = None):
        self.bound = hasattr(optimizer, "param_groups")
        if self.bound:
            check_optimizer(optimizer)
            if warmup or takes_lr:
                raise InputError("warmup and takes_lr apply to an optimizer factory; an optimizer instance is "
                                 "measured with the state and learning rate it has")
            self._check_closure(optimizer, closure)
        elif not callable(optimizer):
            raise InputError(f"optimizer must be a torch.optim.Optimizer or a factory params -> Optimizer; "
                             f"got {type(optimizer)}")
        if closure not in (None, True, False):
            raise InputError(f"closure must be None, True or False; got {closure!r}")
        self.optimizer = optimizer
        self.warmup = check_positive_int(warmup, "warmup", minimum=0)
        self.closure, self.takes_lr, self.requires = closure, bool(takes_lr), requires
        self.name = optimizer_name(optimizer) if name is None else name
        if not isinstance(self.name, str) or not self.name:
            raise InputError(f"a rule name must be a non-empty string; got {self.name!r}")
        self._last: tuple[Any, Tensor, float | None] | None = None  # (weakref to the context, update, lr)
        self._scratch = Scratch()  # the dry runs' copies of θ, ∇L and the state, reused

    def __repr__(self) -> str:
        what = type(self.optimizer).__name__ if self.bound else getattr(self.optimizer, "__name__", "factory")
        return f"OptimizerRule({self.name!r}, {what}, warmup={self.warmup})"

    # -------------------------------------------------------------------------------------- checks
    def _check_closure(self, optimizer: Any, closure: bool | None) -> None:
        if closure is False and needs_closure(optimizer):
            raise InputError(f"{type(optimizer).__name__}.step needs a closure (it re-evaluates the loss); "
                             "closure=False cannot measure it")

    def uses_closure(self, optimizer: Any) -> bool:
        """Whether ``step`` gets a closure (see ``closure``)."""
        self._check_closure(optimizer, self.closure)
        return needs_closure(optimizer) if self.closure is None else self.closure

    @property
    def available(self) -> bool:
        """Whether the library the rule needs (if any) can be imported."""
        return self.unavailable_reason == ""

    @property
    def unavailable_reason(self) -> str:
        """Why the rule cannot be used here (empty when it can)."""
        if self.requires is None:
            return ""
        try:
            importlib.import_module(self.requires)
        except ImportError:
            return f"rule {self.name!r} needs the optional library {self.requires!r}: {EXTRA_HINT}"
        return ""

    # -------------------------------------------------------------------------------------- update
    def __call__(self, ctx: RuleContext, damping: float, lr: float) -> Tensor:
        """Δθ (P,) at the context's state (λ is not used; cached per context: one dry run for all dampings)."""
        if self._last is not None and self._last[0]() is ctx and self._last[2] == lr:
            return self._last[1]
        update = self.update(ctx, lr)
        self._last = (weakref.ref(ctx), update, lr)
        return update

    def update(self, ctx: RuleContext, lr: float | None = None) -> Tensor:
        """Δθ (P,) of one step at the context's state (a dry run for a bound optimizer).

        Args:
            ctx: The state and batch.
            lr: η for a ``takes_lr`` factory.
        """
        reason = self.unavailable_reason
        if reason:
            raise InputError(reason)
        spec = ctx.spec
        if self.bound:
            model = ctx.model
            check_dense_gradients(model)
            check_binding(self.optimizer, model, spec)
            closure = loss_closure(model, ctx) if self.uses_closure(self.optimizer) else None
            grad = ctx.gradient
            version = grad._version
            update = dry_run(self.optimizer, model, spec, grad, closure, name=self.name, scratch=self._scratch,
                             copy_grad=False)
            if grad._version != version:  # the step changed .grad in place: give the context its gradient back
                with torch.no_grad():
                    grad.copy_(ctx.engine().loss_and_gradient()[1])
            return update
        return self._fresh_update(ctx, lr)

    def build(self, params: list[Tensor], lr: float | None = None) -> Any:
        """A new optimizer from the factory over ``params`` (``lr`` passed when ``takes_lr``)."""
        return build_optimizer(self.optimizer, params, lr if self.takes_lr else None, self.name)

    def _fresh_update(self, ctx: RuleContext, lr: float | None) -> Tensor:
        """Factory: a copy of the model in the compute dtype, ``warmup`` steps, θ reset, one measured step."""
        if self.takes_lr and lr is None:
            raise InputError(f"rule {self.name!r} takes the measurement's learning rate: pass lr")
        engine = ctx.engine()
        spec = engine.spec
        work = copy.deepcopy(ctx.model).to(device=engine.device, dtype=engine.dtype)
        check_dense_gradients(work)
        named = dict(work.named_parameters())
        optimizer = self.build([named[n] for n in spec.names], lr)
        check_binding(optimizer, work, spec)
        closure = loss_closure(work, ctx)
        stepped = closure if self.uses_closure(optimizer) else None
        with isolated_rng([engine.device]):
            for _ in range(self.warmup):
                if stepped is None:
                    closure()
                _call_step(optimizer, stepped, self.name)
            with torch.no_grad():
                for n in spec.names:
                    named[n].copy_(engine.params[n])
            return dry_run(optimizer, work, spec, ctx.gradient, stepped, name=self.name, restore=False)


# ----------------------------------------------------------------------------------- Muon with AdamW
class MuonWithAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` on the 2-D parameters (weight matrices) and ``torch.optim.AdamW`` on the others.

    Muon orthogonalises the momentum of matrices only; biases and other tensors get AdamW, the usual way to train
    a whole network with Muon. Both use ``lr`` (Muon with ``adjust_lr_fn="match_rms_adamw"``, which scales its
    step to AdamW's RMS so that one learning rate serves both) and ``weight_decay``.

    Args:
        params: Parameters (tensors; one group).
        lr: Learning rate of both parts.
        weight_decay: Decoupled weight decay of both parts.
        momentum: Muon's momentum.
        nesterov: Muon's Nesterov momentum.
        betas: AdamW's betas.
        eps: AdamW's ε.

    Raises:
        InputError: When the installed torch has no ``torch.optim.Muon``, or ``params`` holds parameter groups.
    """

    def __init__(self, params: Iterable[Tensor], lr: float = 1e-3, weight_decay: float = 0.1,
                 momentum: float = 0.95, nesterov: bool = True, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        if not hasattr(torch.optim, "Muon"):
            raise InputError(f"torch {torch.__version__} has no torch.optim.Muon (added in torch 2.9)")
        params = list(params)
        if any(isinstance(p, dict) for p in params):
            raise InputError("MuonWithAdamW takes parameters, not parameter groups")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        matrices = [p for p in params if p.ndim == 2]
        rest = [p for p in params if p.ndim != 2]
        self.parts: dict[str, torch.optim.Optimizer] = {}
        if matrices:
            self.parts["muon"] = torch.optim.Muon(matrices, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                                  nesterov=nesterov, adjust_lr_fn="match_rms_adamw")
        if rest:
            self.parts["adamw"] = torch.optim.AdamW(rest, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One step of both parts, at this optimizer's current ``lr`` and ``weight_decay`` (schedules act here)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        for part in self.parts.values():
            for g in part.param_groups:
                g["lr"], g["weight_decay"] = group["lr"], group["weight_decay"]
            part.step()
        return loss

    def __getstate__(self) -> dict[str, Any]:
        """Pickled and deep-copied with its parts (torch's optimizers keep only their own state)."""
        return {**super().__getstate__(), "parts": self.parts}

    def state_dict(self) -> dict[str, Any]:
        """``param_groups`` of this optimizer and the state dicts of its parts."""
        return {"param_groups": super().state_dict()["param_groups"],
                "parts": {k: v.state_dict() for k, v in self.parts.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` returned."""
        super().load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        for k, part in self.parts.items():
            part.load_state_dict(state_dict["parts"][k])


# -------------------------------------------------------------------------------------------- built-ins
def _library(module: str, attr: str) -> OptimizerFactory:
    """A factory that imports ``module.attr`` when called (the optional library)."""

    def factory(params: list[Tensor], lr: float | None = None, **kwargs: Any) -> torch.optim.Optimizer:
        cls = getattr(importlib.import_module(module), attr)
        return cls(params, **({} if lr is None else {"lr": lr}), **kwargs)

    factory.__name__ = attr
    return factory


def _torch(attr: str, **options: Any) -> OptimizerFactory:
    return functools.partial(getattr(torch.optim, attr), **options)


#: Built-in optimizer rules: name → (factory, library the factory needs or None).
_BUILTINS: dict[str, tuple[OptimizerFactory | None, str | None]] = {
    "momentum": (_torch("SGD", momentum=0.9), None),
    "nesterov": (_torch("SGD", momentum=0.9, nesterov=True), None),
    "adam-warm": (_torch("Adam"), None),
    "adamw": (_torch("AdamW"), None),
    "adagrad": (_torch("Adagrad"), None),
    "rmsprop": (_torch("RMSprop"), None),
    "adafactor": (_torch("Adafactor") if hasattr(torch.optim, "Adafactor") else None, None),
    "muon": (MuonWithAdamW if hasattr(torch.optim, "Muon") else None, None),
    "shampoo": (_library("pytorch_optimizer", "Shampoo"), "pytorch_optimizer"),
    "soap": (_library("pytorch_optimizer", "SOAP"), "pytorch_optimizer"),
    "psgd-kron": (_library("pytorch_optimizer", "Kron"), "pytorch_optimizer"),
}

#: The registered built-in optimizer rules (those the installed torch can build).
OPTIMIZER_RULES: dict[str, OptimizerRule] = {
    name: OptimizerRule(name, factory, warmup=DEFAULT_WARMUP, takes_lr=True, requires=requires)
    for name, (factory, requires) in _BUILTINS.items() if factory is not None
}
for _rule in OPTIMIZER_RULES.values():
    register_rule(_rule)


def optimizer_rules() -> dict[str, str]:
    """Every built-in optimizer rule → ``"available"`` or why not (a missing library or torch version)."""
    out = {}
    for name, (factory, _) in _BUILTINS.items():
        if factory is None:
            attr = "Muon" if name == "muon" else "Adafactor"
            out[name] = f"torch {torch.__version__} has no torch.optim.{attr}"
        else:
            out[name] = OPTIMIZER_RULES[name].unavailable_reason or "available"
    return out


__all__ = ["DEFAULT_WARMUP", "EXTRA_HINT", "OPTIMIZER_RULES", "MuonWithAdamW", "OptimizerFactory", "OptimizerRule",
           "Scratch", "build_optimizer", "check_binding", "check_dense_gradients", "check_optimizer", "dry_run",
           "held_parameters", "isolated_rng", "loss_closure", "needs_closure", "optimizer_name", "optimizer_rules"]
