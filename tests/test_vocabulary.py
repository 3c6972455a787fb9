"""One name a concept: every renamed spelling gives a clear deprecation (or error) naming the new one, and the new
names select what they say."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import fisherlab
from fisherlab.data import load_digits
from fisherlab.errors import InputError
from fisherlab.fidelity.rules import ExactNGD, ReconstructedGD, StructuredNGD, get_rule
from fisherlab.models import MLP
from fisherlab.vocabulary import RECONSTRUCTIBLE, STRUCTURE_TABLE, BlockBy, FisherKind, RootMethod, Structure


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = MLP(4, [3], 3).double().eval()
    X, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    return model, (X, y)


def test_top_level_functions_and_the_old_module_path() -> None:
    from fisherlab.fidelity import evaluate_fidelity, fidelity_trajectory, fisher_geometry
    from fisherlab.reconstruction import ReconstructedNetwork, reconstruct

    assert fisherlab.reconstruct is reconstruct and fisherlab.evaluate_fidelity is evaluate_fidelity
    assert fisherlab.fidelity_trajectory is fidelity_trajectory and fisherlab.fisher_geometry is fisher_geometry
    with pytest.warns(DeprecationWarning, match="fisherlab.reconstruct is now fisherlab.reconstruction"):
        from fisherlab.reconstruct import ReconstructedNetwork as Old
    assert Old is ReconstructedNetwork
    assert fisherlab.reconstruct is reconstruct  # importing the old module path does not shadow the function


def test_import_fisherlab_is_cheap_and_side_effect_free() -> None:
    code = ("import sys, fisherlab; assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules; "
            "import fisherlab.report, matplotlib, torch; b = matplotlib.get_backend(); "
            "print(torch.get_default_dtype(), b)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"MPLBACKEND": "svg", "PATH": ""}).stdout.split()
    assert out == ["torch.float32", "svg"]


def test_reconstruct_kind_and_dense(small) -> None:
    model, data = small
    with pytest.warns(DeprecationWarning, match="fisher= is deprecated; use kind="):
        old = fisherlab.reconstruct(model, data, structure="dense", fisher="empirical", damping=0.1)
    new = fisherlab.reconstruct(model, data, structure="dense", kind="empirical", damping=0.1)
    assert old.config.kind == new.config.kind == "empirical"
    with pytest.warns(DeprecationWarning, match="structure='full' is deprecated; use 'dense'"):
        full = fisherlab.reconstruct(model, data, structure="full", damping=0.1)
    assert full.structure == "dense"
    with pytest.raises(InputError, match="pass kind= only"):
        fisherlab.reconstruct(model, data, structure="dense", kind="mc", fisher="true")


def test_train_rule_and_kind() -> None:
    from fisherlab.train import train

    data = load_digits().train_subset(64)
    model = MLP(64, [4], 10).eval()
    with pytest.warns(DeprecationWarning, match="method= is deprecated; use rule="):
        old = train(model, data, method="sgd", lr=0.1, steps=2, batch_size=16)
    new = train(model, data, rule="sgd", lr=0.1, steps=2, batch_size=16)
    np.testing.assert_array_equal(old.loss.values, new.loss.values)
    with pytest.warns(DeprecationWarning, match="fisher_kind= is deprecated; use kind="):
        train(model, data, rule="ngd", lr=0.1, steps=1, batch_size=16, fisher_kind="empirical")
    with pytest.raises(InputError, match="unknown training rule None.*train needs rule="):
        train(model, data, lr=0.1, steps=1)


def test_trajectory_train_rule_and_the_old_rule_name(small) -> None:
    model, data = small
    with pytest.warns(DeprecationWarning, match="train_method= is deprecated; use train_rule="):
        ds = fisherlab.fidelity_trajectory(model, data, train_method="gd", steps=1, every=1, rules=["gd"])
    assert ds.attrs["train_rule"] == "gd"
    with pytest.warns(DeprecationWarning, match="rule 'sngd-full' is deprecated; use 'sngd-dense'"):
        assert get_rule("sngd-full") is get_rule("sngd-dense")


def test_a_registered_reconstructed_rule_trains(small) -> None:
    """The rule knows its structure and root method: no name parsing (``sngd-kfac-lowrank`` used to fail)."""
    model, data = small
    rule = get_rule("sngd-kfac-lowrank")
    assert isinstance(rule, ReconstructedGD) and rule.structure is Structure.KFAC and rule.sqrt is RootMethod.LOWRANK
    ds = fisherlab.fidelity_trajectory(model, data, train_rule="sngd-kfac-lowrank", steps=2, every=1,
                                       refresh_every=1, rules=["sngd-kfac"], damping=0.1)
    # rank-64 roots of these small factors are exact: the trained step is the KFAC step
    np.testing.assert_allclose(ds.cosine.sel(rule="train:sngd-kfac-lowrank").values,
                               ds.cosine.sel(rule="sngd-kfac").values, atol=1e-10)
    custom = ReconstructedGD("sngd-kfac-r1", "kfac", "lowrank", {"root_rank": 1})  # enums or their strings
    assert custom.structure is Structure.KFAC and custom.sqrt is RootMethod.LOWRANK
    with pytest.raises(InputError, match="structure 'lowrank' has no reconstructed network"):
        ReconstructedGD("sngd-lowrank", "lowrank")
    out = fisherlab.evaluate_fidelity(model, data, rules=["kfac", custom], damping=0.1)
    assert out.rule.values.tolist() == ["kfac", "sngd-kfac-r1"]


def test_rules_state_what_they_are() -> None:
    assert isinstance(get_rule("ngd"), ExactNGD) and get_rule("ngd").kind is FisherKind.TRUE
    assert get_rule("empirical-ngd").kind is FisherKind.EMPIRICAL
    block = get_rule("block-ngd")
    assert isinstance(block, StructuredNGD) and block.structure is Structure.BLOCK
    assert {f"sngd-{s}" for s in RECONSTRUCTIBLE} <= set(fisherlab.fidelity.RULES)


def test_block_means_one_block_per_layer_everywhere(small) -> None:
    model, data = small
    F = fisherlab.fisher(model, data, structure="block")
    assert list(F.index) == ["layers.0", "layers.2"]  # weight and bias of a layer in one block
    tensors = fisherlab.fisher(model, data, structure="block", by="tensor")
    assert list(tensors.index) == [n for n, _ in model.named_parameters()]
    with pytest.raises(InputError, match="unknown block grouping 'module'; valid: \\['layer', 'tensor'\\]"):
        fisherlab.fisher(model, data, structure="block", by="module")
    assert STRUCTURE_TABLE[Structure.BLOCK].options == {"by": BlockBy.LAYER.value}


def test_spectra_damping_and_structures(small) -> None:
    model, data = small
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = fisherlab.fisher_spectra(model, data, kinds=["true"], structures=["dense"], damping=1e-2)
    with pytest.warns(DeprecationWarning, match="dampings= is deprecated; use damping="):
        old = fisherlab.fisher_spectra(model, data, kinds=["true"], structures=["dense"], dampings=[1e-2])
    np.testing.assert_array_equal(new.condition_number.values, old.condition_number.values)
    assert new.condition_number.dims == ("kind", "structure", "damping")


def test_likelihood_is_the_third_argument_everywhere() -> None:
    import inspect

    from fisherlab.train import train

    for fn in (fisherlab.fisher, fisherlab.reconstruct, fisherlab.evaluate_fidelity, fisherlab.fidelity_trajectory,
               fisherlab.fisher_geometry, fisherlab.fisher_spectra, fisherlab.spectral_density, train):
        params = list(inspect.signature(fn).parameters)
        assert params[:3] == ["model", "data", "likelihood"], fn.__name__


def test_str_enums_accept_their_strings() -> None:
    assert FisherKind("true") is FisherKind.TRUE and FisherKind.TRUE == "true"
    assert fisherlab.FisherType is FisherKind
    with pytest.raises(InputError, match=r"unknown Fisher kind 'hessian'; valid: \['true', 'mc', 'empirical', 'ggn'\]"):
        fisherlab.fisher(MLP(2, [], 2).eval(), (torch.randn(3, 2), torch.tensor([0, 1, 0])), kind="hessian")


@pytest.mark.parametrize(("call", "match"), [
    (lambda m, d: fisherlab.reconstruct(m, d, structure="kfac", split="half"),
     r"unknown damping split 'half'; valid: \['pi', 'sqrt'\]"),
    (lambda m, d: fisherlab.reconstruct(m, d, structure="kfac", fold="sometimes"),
     r"unknown fold mode 'sometimes'; valid: \['auto', 'never', 'always'\]"),
    (lambda m, d: fisherlab.fisher(m, d, structure="kfac", unsupported="skip"),
     r"unknown unsupported= mode 'skip'; valid: \['error', 'block'\]"),
    (lambda m, d: fisherlab.reconstruct(m, d, structure="kfac", sqrt="qr"),
     r"unknown sqrt method 'qr'; valid: \['eigh', 'denman_beavers', 'newton_schulz', 'cholesky', 'lowrank'\]"),
])
def test_every_closed_option_set_lists_its_values(small, call, match) -> None:
    model, data = small
    with pytest.raises(InputError, match=match):
        call(model, data)


def test_enum_members_are_accepted_where_strings_are(small) -> None:
    from fisherlab.vocabulary import FoldMode, KronSplit

    model, data = small
    a = fisherlab.reconstruct(model, data, structure=Structure.KFAC, split=KronSplit.SQRT, fold=FoldMode.NEVER,
                              sqrt=RootMethod.CHOLESKY, kind=FisherKind.EMPIRICAL, damping=0.1)
    b = fisherlab.reconstruct(model, data, structure="kfac", split="sqrt", fold="never", sqrt="cholesky",
                              kind="empirical", damping=0.1)
    torch.testing.assert_close(a.gd_update(data, 0.1), b.gd_update(data, 0.1), rtol=0, atol=0)
