"""Faults that used to give a silent wrong number or a raw traceback (issue 10) end in a named fisherlab error.

One test per fault, through every public entry point that takes the faulty input: the error class, a message that
names the cause, and — for the faults that used to be silent — that no number came back. Tiny float64 models, so
the file runs in seconds.
"""

from __future__ import annotations

import copy
import inspect
import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
from cases import Bag
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import fisherlab
from fisherlab import errors
from fisherlab.cli import main
from fisherlab.data import SplitData
from fisherlab.errors import FisherlabError, InputError, NonFiniteError, SingularMatrixError
from fisherlab.fidelity.rules import FunctionRule
from fisherlab.structures import STRUCTURES, DenseFisher
from fisherlab.train import train

F64 = torch.float64
N = 12


def mlp(outputs: int = 3, dtype: torch.dtype = F64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, outputs)).to(dtype)


def batch(dtype: torch.dtype = F64) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(N, 4, generator=gen, dtype=dtype), torch.randint(0, 3, (N,), generator=gen)


def split(X: Tensor, y: Tensor) -> SplitData:
    return SplitData(X, y, X, y, "toy", "multiclass", 3, (4,))


def state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model: nn.Module, before: dict[str, Tensor]) -> bool:
    after = model.state_dict()
    return all(torch.allclose(after[k], v, rtol=0, atol=0, equal_nan=True) if v.is_floating_point()
               else torch.equal(after[k], v) for k, v in before.items())


#: The public entry points that take a model and data, each at its cheapest settings.
ENTRY: dict[str, Callable[..., Any]] = {
    "fisher": lambda m, d, lik="categorical", **k: fisherlab.fisher(m, d, lik, **k),
    "reconstruct": lambda m, d, lik="categorical", **k: fisherlab.reconstruct(m, d, lik, structure="block", **k),
    "evaluate_fidelity": lambda m, d, lik="categorical", **k: fisherlab.evaluate_fidelity(
        m, d, lik, rules=["gd", "ngd", "diag"], **k),
    "fidelity_trajectory": lambda m, d, lik="categorical", **k: fisherlab.fidelity_trajectory(
        m, d, lik, rules=["gd"], steps=1, every=1, **k),
    "fisher_geometry": lambda m, d, lik="categorical", **k: fisherlab.fisher_geometry(
        m, d, lik, structures=["diag"], num_eigs=2, **k),
    "fisher_spectra": lambda m, d, lik="categorical", **k: fisherlab.fisher_spectra(
        m, d, lik, kinds=["true"], structures=["dense"], **k),
    "spectral_density": lambda m, d, lik="categorical", **k: fisherlab.spectral_density(
        m, d, lik, kinds=["true"], num_probes=2, num_steps=3, **k),
}
#: ... and train, which takes a SplitData.
ALL = [*ENTRY, "train"]


def call(entry: str, model: nn.Module, data: Any, lik: str = "categorical", **kwargs: Any) -> Any:
    if entry == "train":
        X, y = data
        return train(model, split(X, y), lik, rule="sgd", lr=0.1, steps=1, batch_size=6, eval_every=1, **kwargs)
    return ENTRY[entry](model, data, lik, **kwargs)


# ------------------------------------------------------------------------- 1. data whose order changes
def test_shuffling_dataloader_is_refused_by_every_entry_point():
    X, y = batch()
    for entry in ENTRY:
        loader = DataLoader(TensorDataset(X, y), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
        with pytest.raises(InputError, match=r"different batch \d+ on this pass.*shuffle=False.*\(X, y\) tensors"):
            call(entry, mlp(), loader)


class LateSwap:
    """Re-iterable batches whose first batch never changes and whose last two swap places on every other pass."""

    def __init__(self, X: Tensor, y: Tensor):
        self.batches = [(X[i: i + 4], y[i: i + 4]) for i in range(0, len(X), 4)]
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        swapped = [*self.batches[:-2], self.batches[-1], self.batches[-2]]
        return iter(self.batches if self.passes % 2 else swapped)


def test_a_later_batch_that_changes_is_refused():
    X, y = batch()
    with pytest.raises(InputError, match=r"different batch 1 on this pass"):
        fisherlab.fisher(mlp(), LateSwap(X, y), kind="mc")


def test_reconstructed_network_refuses_a_shuffling_loader():
    X, y = batch()
    net = fisherlab.reconstruct(mlp(), (X, y), structure="diag")
    loader = DataLoader(TensorDataset(X, y), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    with pytest.raises(InputError, match="shuffle=False"):
        net.prime_gradient(loader)


def test_unshuffled_dataloader_gives_the_numbers_of_tensors():
    X, y = batch()
    loader = DataLoader(TensorDataset(X, y), batch_size=5, shuffle=False)
    for kind in ("mc", "empirical"):
        F_tensors = fisherlab.fisher(mlp(), (X, y), kind=kind, mc_samples=2).to_dense()
        F_loader = fisherlab.fisher(mlp(), loader, kind=kind, mc_samples=2).to_dense()
        torch.testing.assert_close(F_loader, F_tensors, rtol=1e-12, atol=1e-14)
    a = fisherlab.evaluate_fidelity(mlp(), (X, y), rules=["gd", "ngd"], progress=False)
    b = fisherlab.evaluate_fidelity(mlp(), loader, rules=["gd", "ngd"], progress=False)
    for var in ("kl_measured", "loss_change", "cosine"):
        np.testing.assert_allclose(b[var].values, a[var].values, rtol=1e-10)


# ------------------------------------------------------------- 2. NaN / inf outside trainable parameters
def bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).to(F64).eval()


def poison(where: str, value: float) -> nn.Module:
    model = bn_model()
    with torch.no_grad():
        if where == "buffer":
            model[1].running_var[2] = value
        else:
            model[0].weight.requires_grad_(False)
            model[0].weight[1, 1] = value
    return model


@pytest.mark.parametrize("entry", ALL)
@pytest.mark.parametrize(("where", "value", "match"), [
    ("buffer", math.nan, r"buffer '1.running_var' contains NaN"),
    ("buffer", math.inf, r"statistics buffer '1.running_var' contains NaN or infinite"),
    ("frozen", math.nan, r"frozen parameter '0.weight' contains NaN"),
])
def test_non_finite_buffers_and_frozen_parameters_are_named(entry, where, value, match):
    model = poison(where, value)
    before = state(model)
    with pytest.raises(NonFiniteError, match=match):
        call(entry, model, batch())
    assert same_state(model, before)


class LogOfFirstInput(nn.Module):
    """Finite parameters, but outputs log(x₀): NaN for a sample with a negative first input."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3).to(F64)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x) + torch.log(x[:, :1])


@pytest.mark.parametrize("entry", ENTRY)
def test_non_finite_outputs_of_a_late_sample_are_named(entry):
    X, y = batch()
    X[:, 0] = X[:, 0].abs() + 0.1
    X[9, 0] = -1.0
    with pytest.raises(NonFiniteError, match=r"outputs for sample 9 contain NaN"):
        call(entry, LogOfFirstInput(), (X, y))


# ---------------------------------------------------------------------------------------- 3. precision
def large_logits_half() -> nn.Module:
    model = mlp(dtype=torch.float16)
    with torch.no_grad():
        model[2].weight.mul_(3000)  # outputs are finite in float16; squared gradients are not
    return model


@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_half_precision_overflow_is_refused_with_the_remedy(structure):
    X, y = batch(torch.float16)
    assert bool(torch.isfinite(large_logits_half()(X)).all())
    options = {"rank": 4} if structure == "lowrank" else {}
    with pytest.raises(NonFiniteError, match=r"empirical .*NaN or infinite.*float16.*dtype=torch.float32"):
        F = fisherlab.fisher(large_logits_half(), (X, y), kind="empirical", structure=structure, **options)
        F.diag()  # the implicit Fisher stores no entries: its first product overflows (named by the products)


def test_half_precision_remedy_gives_the_float64_numbers():
    X, y = batch()
    model = large_logits_half()
    F32 = fisherlab.fisher(model, (X, y), kind="empirical", dtype=torch.float32).to_dense()
    F64_ = fisherlab.fisher(model, (X, y), kind="empirical", dtype=F64).to_dense()
    assert bool(torch.isfinite(F32).all())
    torch.testing.assert_close(F32.double(), F64_, rtol=1e-4, atol=1e-4 * float(F64_.abs().max()))


def test_every_dtype_passes_the_same_finiteness_check():
    F = fisherlab.fisher(mlp(), batch())
    for dtype in (F64, torch.float32, torch.float16):
        bad = F.matrix.to(dtype).clone()
        bad[0, 0] = math.inf
        with pytest.raises(NonFiniteError, match=rf"true dense Fisher has NaN or infinite entries \(matrix.*{dtype}"):
            DenseFisher(F.spec, F.kind, dtype, F.device, F.memory_budget, {}, bad)


GGN_ENTRY = {
    "fisher": lambda m, d: fisherlab.fisher(m, d, kind="ggn", dtype=torch.float16),
    "reconstruct": lambda m, d: fisherlab.reconstruct(m, d, kind="ggn", dtype=torch.float16),
    "fisher_spectra": lambda m, d: fisherlab.fisher_spectra(m, d, kinds=["true", "ggn"], structures=["dense"],
                                                            dtype=torch.float16),
    "spectral_density": lambda m, d: fisherlab.spectral_density(m, d, kinds=["ggn"], dtype=torch.float16),
}


@pytest.mark.parametrize("entry", GGN_ENTRY)
def test_ggn_in_half_precision_says_what_to_do(entry):
    with pytest.raises(InputError, match=r"kind='ggn'.*float16: compute in float32 \(dtype=torch.float32\)"):
        GGN_ENTRY[entry](mlp(dtype=torch.float16), batch(torch.float16))


# ----------------------------------------------------------------------------------- 4. randomness
class FunctionalDropout(nn.Module):
    """Dropout as a function call: no nn.Dropout module for the train-mode check to see."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 8).to(F64), nn.Linear(8, 3).to(F64)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(nnf.dropout(torch.tanh(self.a(x)), 0.5, self.training))


class NoiseInside(nn.Module):
    """A random operation whose result does not change the outputs (so only vmap sees it)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3).to(F64)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x + 0 * torch.randn_like(x))


@pytest.mark.parametrize("entry", [*ENTRY, "train"])
def test_functional_dropout_in_train_mode_is_refused(entry):
    extra = {"rule": "ngd"} if entry == "train" else {}
    model = FunctionalDropout()  # training mode, as built
    with pytest.raises(InputError, match=r"outputs are random.*model.training is True.*model.eval\(\)"):
        if entry == "train":
            X, y = batch()
            train(model, split(X, y), lr=0.1, steps=1, batch_size=6, **extra)
        else:
            call(entry, model, batch())


def test_random_operation_seen_by_vmap_is_refused_and_eval_mode_is_deterministic():
    # the empirical Fisher's factor rows are vmapped; the true Fisher of linear layers is not (structures.dense)
    with pytest.raises(InputError, match=r"calls a random operation.*model.eval\(\)"):
        fisherlab.fisher(NoiseInside(), batch(), kind="empirical")
    model = FunctionalDropout().eval()
    a = fisherlab.fisher(model, batch()).to_dense()
    b = fisherlab.fisher(model, batch()).to_dense()
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------ 5. degenerate likelihood
@pytest.mark.parametrize("entry", ALL)
def test_categorical_with_one_output_is_refused(entry):
    X, _ = batch()
    with pytest.raises(InputError, match=r"categorical likelihood needs C ≥ 2.*C = 1.*likelihood='bernoulli'"):
        call(entry, mlp(outputs=1), (X, torch.zeros(N, dtype=torch.long)))


def zero_update(ctx: Any, damping: float, lr: float) -> Tensor:
    return torch.zeros_like(ctx.gradient)


@pytest.mark.parametrize("entry", ["evaluate_fidelity", "fidelity_trajectory"])
def test_a_rule_with_non_finite_metrics_is_never_available(entry):
    rules = ["gd", FunctionRule("zero", zero_update)]
    if entry == "evaluate_fidelity":
        ds = fisherlab.evaluate_fidelity(mlp(), batch(), rules=rules, damping=[1e-3, 1e-2], progress=False)
    else:
        ds = fisherlab.fidelity_trajectory(mlp(), batch(), rules=rules, steps=1, every=1, progress=False)
        ds = ds.isel(step=-1)
    zero, gd = ds.sel(rule="zero"), ds.sel(rule="gd")
    assert int(zero.available) == 0 and "non-finite metrics" in str(zero.unavailable_reason.values)
    assert "cosine=nan" in str(zero.unavailable_reason.values)
    assert bool(np.isnan(zero.cosine.values).all())
    assert int(gd.available) == 1 and bool(np.isfinite(gd.cosine.values).all())


# -------------------------------------------------------------------------- 6. reconstructed targets
def test_reconstructed_network_checks_targets_as_fisher_does():
    X, _ = batch()
    Y = torch.randn(N, 3, dtype=F64)
    net = fisherlab.reconstruct(mlp(), (X, Y), "gaussian", structure="diag")
    for method in (lambda d: net.prime_gradient(d), lambda d: net.gd_update(d, 0.1)):
        with pytest.raises(InputError, match=r"Gaussian targets must have the outputs' shape \(12, 3\); got \(12, 1\)"):
            method((X, Y[:, :1]))
    X, y = batch()
    net = fisherlab.reconstruct(mlp(), (X, y), structure="diag")
    with pytest.raises(InputError, match="categorical targets must be integer class labels"):
        net.gd_update((X, y.double() + 0.5), 0.1)
    with pytest.raises(InputError, match=r"labels must lie in \[0, 3\)"):
        net.prime_gradient((X, y + 3))


# ----------------------------------------------------------------------------------------- 7. damping
BAD_DAMPINGS = [(-1.0, InputError, "damping must be ≥ 0"), (math.nan, NonFiniteError, "damping must be finite"),
                (math.inf, NonFiniteError, "damping must be finite")]


@pytest.fixture(scope="module")
def every_structure() -> dict[str, Any]:
    X, y = batch()
    return {s: fisherlab.fisher(mlp(), (X, y), structure=s, **({"rank": 4} if s == "lowrank" else {}))
            for s in STRUCTURES}


@pytest.mark.parametrize(("damping", "error", "match"), BAD_DAMPINGS)
def test_bad_damping_is_refused_by_every_structure(every_structure, damping, error, match):
    for F in every_structure.values():
        g = torch.ones(F.shape[0], dtype=F64)
        with pytest.raises(error, match=match):
            F.solve(g, damping)
        with pytest.raises(error, match=match):
            F.condition_number(damping)
    with pytest.raises(error, match=match):
        every_structure["kfac"].inv_sqrt_factors(damping)
    with pytest.raises(error, match=match):
        every_structure["lowrank"].damped_power(torch.ones(every_structure["lowrank"].shape[0]), damping, -0.5)
    with pytest.raises(error, match=match.replace("damping", "relative_damping")):
        fisherlab.fisher(mlp(), batch(), structure="unit", relative_damping=damping)


@pytest.mark.parametrize("entry", [e for e in ALL if e not in ("fisher", "spectral_density")])
@pytest.mark.parametrize(("damping", "error", "match"), BAD_DAMPINGS)
def test_bad_damping_is_refused_by_every_entry_point(entry, damping, error, match):
    value = [0.0, damping] if entry == "fisher_spectra" else damping
    with pytest.raises(error, match=match):
        call(entry, mlp(), batch(), damping=value)


@pytest.mark.parametrize("value", ["nan", "-1"])
def test_cli_refuses_a_bad_damping_before_claiming_the_folder(tmp_path, capsys, value):
    out = tmp_path / "spectra"
    assert main(["spectra", "--out", str(out), "--damping", "0", value]) == 2
    assert "damping" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


# ----------------------------------------------------------------------------------- 8. named errors
DEVICES = [("gpu", r"'gpu' is not a torch device"), ("meta", r"device 'meta': fisherlab runs on cpu, cuda or mps")]
if not torch.cuda.is_available():
    DEVICES.append(("cuda", r"device 'cuda': CUDA is not available on this machine"))
else:
    DEVICES.append((f"cuda:{torch.cuda.device_count()}", r"this machine has \d+ CUDA device"))


@pytest.mark.parametrize("entry", ALL)
@pytest.mark.parametrize(("device", "match"), DEVICES)
def test_unavailable_device_is_named(entry, device, match):
    with pytest.raises(InputError, match=match):
        call(entry, mlp(), batch(), device=device)


def test_cli_refuses_an_unavailable_device(tmp_path, capsys):
    assert main(["spectra", "--out", str(tmp_path / "s"), "--device", "gpu"]) == 2
    assert "'gpu' is not a torch device" in capsys.readouterr().err


@pytest.mark.parametrize("entry", ALL)
def test_model_on_the_meta_device_is_named(entry):
    with pytest.raises(InputError, match=r"parameter '0.weight' is on the meta device.*to_empty"):
        call(entry, mlp().to("meta"), batch())


@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_unknown_structure_option_lists_the_valid_ones(structure):
    valid = [n for n in inspect.signature(STRUCTURES[structure]).parameters if n != "engine"]
    message = f"unknown option(s) ['colour'] of the '{structure}' structure; its options: {valid or 'none'}"
    with pytest.raises(InputError, match=re.escape(message)):
        fisherlab.fisher(mlp(), batch(), structure=structure, colour="red")
    with pytest.raises(InputError, match=r"unknown option\(s\) \['colour'\] of the 'kfac' structure"):
        fisherlab.reconstruct(mlp(), batch(), structure="kfac", colour="red")


@pytest.mark.parametrize("entry", ALL)
def test_dtype_names_are_accepted_and_a_bad_one_is_named(entry):
    with pytest.raises(InputError, match=r"unknown dtype 'float65'; valid: \['float32', 'float64'"):
        call(entry, mlp(), batch(), dtype="float65")
    if entry == "fisher":
        by_name = fisherlab.fisher(mlp(dtype=torch.float32), batch(), dtype="float64")
        by_dtype = fisherlab.fisher(mlp(dtype=torch.float32), batch(), dtype=F64)
        assert by_name.dtype == F64 and torch.equal(by_name.to_dense(), by_dtype.to_dense())
    else:
        call(entry, mlp(dtype=torch.float32), batch(), dtype="float64")


@pytest.mark.parametrize("entry", ENTRY)  # (train takes float inputs only: SplitData)
def test_out_of_range_embedding_index_names_the_sample(entry):
    _, y = batch()
    tokens = torch.randint(0, 10, (N, 3), generator=torch.Generator().manual_seed(2))
    tokens[10, 1] = 12
    with pytest.raises(InputError, match=r"could not be evaluated on sample 10 .*index out of range"):
        call(entry, Bag(), (tokens, y))


@pytest.mark.parametrize("entry", ENTRY)
def test_one_shot_generator_is_said_to_be_consumed(entry):
    X, y = batch()
    batches = ((X[i: i + 4], y[i: i + 4]) for i in range(0, N, 4))
    with pytest.raises(InputError, match=r"one-shot iterator \(generator\): it is consumed by the first pass"):
        call(entry, mlp(), batches)


class SameIterator:
    """An iterable whose ``__iter__`` returns one and the same iterator: one pass consumes it."""

    def __init__(self, X: Tensor, y: Tensor):
        self.batches = iter([(X[i: i + 4], y[i: i + 4]) for i in range(0, len(X), 4)])

    def __iter__(self):
        return self.batches


class Stream:
    """A re-iterable that gives its batches on two passes and nothing afterwards (a stream read to its end)."""

    def __init__(self, X: Tensor, y: Tensor):
        self.batches = [(X[i: i + 4], y[i: i + 4]) for i in range(0, len(X), 4)]
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches if self.passes <= 2 else [])


def test_iterable_consumed_by_a_pass_is_said_to_be_consumed():
    with pytest.raises(InputError, match=r"returns the same iterator on every pass, so the first pass consumed it"):
        fisherlab.fisher(mlp(), SameIterator(*batch()))
    with pytest.raises(InputError, match=r"gave 0 batches on this pass but 3 on an earlier one \(it was consumed"):
        fisherlab.fisher(mlp(), Stream(*batch()))


def test_failed_refresh_leaves_the_network_unchanged(monkeypatch):
    X, y = batch()
    net = fisherlab.reconstruct(mlp(), (X, y), structure="block", damping=1e-3, ema_decay=0.5)
    net.count_step()
    before, outputs = state(net), net(X).detach()

    def unchanged() -> None:
        assert net.refreshes == 0 and net.steps_since_refresh == 1
        assert same_state(net, before)
        assert torch.equal(net(X).detach(), outputs)

    with pytest.raises(InputError, match=r"labels must lie in \[0, 3\)"):  # fails computing G
        net.refresh((X, y + 3))
    unchanged()
    (_, first), (_, second) = list(net.units())[:2]

    def broken(*args: Any, **kwargs: Any) -> None:
        raise SingularMatrixError("injected: the second unit's roots fail")

    monkeypatch.setattr(second, "update", broken)  # fails after the first unit took its new roots
    with pytest.raises(SingularMatrixError, match="injected"):
        net.refresh()
    unchanged()
    monkeypatch.undo()
    net.refresh()
    assert net.refreshes == 1 and net.steps_since_refresh == 0
    torch.testing.assert_close(net(X).detach(), outputs)


def test_every_error_and_warning_class_is_exported_at_top_level():
    defined = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    assert {"ConvergenceError", "NonFiniteError", "InputError"} <= {c.__name__ for c in defined}
    for cls in defined:
        assert getattr(fisherlab, cls.__name__) is cls and cls.__name__ in fisherlab.__all__
        assert issubclass(cls, (FisherlabError, Warning))


def test_an_additive_attention_mask_buffer_may_hold_minus_inf():
    """−inf in a mask buffer is how torch builds causal masks: accepted; the outputs are what must be finite."""
    from fisherlab import fisher

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(3))

        def forward(self, x):
            return self.lin(x) + self.mask.clamp(min=-1e4)[0]

    torch.manual_seed(0)
    model = Masked().double().eval()
    X, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    F = fisher(model, (X, y), structure="dense").to_dense()
    # the mask's first row [0, -inf, -inf], clamped, shifts the logits by a constant: fold it into the bias
    folded = copy.deepcopy(model.lin)
    with torch.no_grad():
        folded.bias += model.mask.clamp(min=-1e4)[0]
    ref = fisher(folded, (X, y), structure="dense").to_dense()
    torch.testing.assert_close(F, ref, rtol=1e-12, atol=1e-14)


def test_an_over_long_out_folder_is_a_named_error(tmp_path, capsys):
    from fisherlab.cli import main
    from fisherlab.results import guard_output_folder

    long = tmp_path / ("a" * 300)
    assert main(["spectra", "--n-samples", "16", "--kinds", "true", "--out", str(long)]) == 2
    err = capsys.readouterr().err
    assert "fisherlab: error: --out:" in err and "File name too long" in err and "Traceback" not in err
    with pytest.raises(InputError, match="can't create the output folder .*File name too long"):
        guard_output_folder(long, {"command": "test"})
    assert not any(tmp_path.iterdir())
