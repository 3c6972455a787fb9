"""vᵀ F v by forward mode alone (``FisherEngine.quadratic_forms``, ``FisherMatrix.quadratic_forms``) and
Hutchinson's trace estimator on them, against the float64 brute-force Fisher of tests/reference.py."""

from __future__ import annotations

import pytest
import reference as ref
import torch
from test_transformer import CAT, _case, _custom_case, _Softplus

from fisherlab import fisher, structures
from fisherlab.errors import FallbackWarning, InputError
from fisherlab.linalg import hutchinson_trace

F64 = torch.float64
RTOL = 1e-12
CASES = ("mlp", "mlp_gaussian", "mlp_bernoulli", "cnn2d", "lstm", "resnet_bn", "custom")


def _columns(P: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(P, k, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _expected(F: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """vᵢᵀ F vᵢ by explicit products with the dense reference: (k,)."""
    return torch.einsum("pk,pq,qk->k", V, F, V)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("kind", ["true", "mc", "empirical"])
def test_quadratic_forms_equal_the_dense_reference(problems, name: str, kind: str) -> None:
    p = problems(name)
    engine = p.engine(kind, mc_samples=2, seed=3)
    V = _columns(engine.spec.dim, 5)
    got = engine.quadratic_forms(V)  # before any product: the output state computed in the chunk
    expected = _expected(p.reference(kind, labels=engine._labels), V)
    assert got.shape == (5,) and bool((expected > 0).all())
    ref.assert_close(got, expected, RTOL, f"{name} {kind} vᵀFv")
    engine.matmat(V[:, :2])  # keeps the linearisation and its output state
    ref.assert_close(engine.quadratic_forms(V), expected, RTOL, f"{name} {kind} vᵀFv, kept output state")
    ref.assert_close(engine.quadratic_forms(V[:, 3]), expected[3], RTOL, f"{name} {kind} vᵀFv of a vector")


@pytest.mark.parametrize("structure", ["dense", "diag"])
def test_other_structures_give_their_own_quadratic_forms(problems, structure: str) -> None:
    p = problems("mlp")
    F_ref = p.reference("true")
    expected = F_ref if structure == "dense" else torch.diag(F_ref.diagonal())
    V = _columns(F_ref.shape[0], 3, seed=1)
    got = structures.build(structure, p.engine("true")).quadratic_forms(V)
    ref.assert_close(got, _expected(expected, V), 1e-10, f"{structure} vᵀFv")


@pytest.mark.parametrize("name", ["gpt", "mha", "sdpa", "encoder"])
def test_quadratic_forms_of_attention_models(name: str) -> None:
    model, X, y = _case(name)
    F_ref = ref.true_fisher(model, X, CAT)
    V = _columns(F_ref.shape[0], 3, seed=2)
    implicit = fisher(model, (X, y), "categorical", structure="implicit", dtype=F64)
    ref.assert_close(implicit.quadratic_forms(V), _expected(F_ref, V), 1e-10, f"{name}: vᵀFv")


def test_no_forward_rule_falls_back_to_products() -> None:
    model, X, y = _custom_case(_Softplus)
    F_ref = ref.true_fisher(model, X, CAT)
    V = _columns(F_ref.shape[0], 4, seed=3)
    implicit = fisher(model, (X, y), "categorical", structure="implicit")
    with pytest.warns(FallbackWarning, match="two reverse passes"):
        got = implicit.quadratic_forms(V)
    ref.assert_close(got, _expected(F_ref, V), 1e-10, "double-VJP vᵀFv")


def test_hutchinson_on_quadratic_forms_is_the_product_estimate(problems) -> None:
    p = problems("cnn2d")
    F = structures.build("implicit", p.engine("true"))
    P = F.shape[0]
    kw = dict(num_probes=40, seed=7, dtype=F64)
    est_q, se_q = hutchinson_trace(F.matmat, P, quadratic_forms=F.quadratic_forms, **kw)
    est_p, se_p = hutchinson_trace(F.matmat, P, batched=True, **kw)  # the same probes through F V
    ref.assert_close(est_q, est_p, RTOL, "estimate")
    ref.assert_close(se_q, se_p, 1e-10, "stderr")
    exact = p.reference("true").trace()
    assert abs(float(est_q) - float(exact)) < 4 * float(se_q) + 1e-12  # an unbiased estimate of the brute-force trace


def test_bad_operands_are_named_errors(problems) -> None:
    engine = problems("mlp").engine("true")
    P = engine.spec.dim
    with pytest.raises(InputError, match="P ="):
        engine.quadratic_forms(torch.ones(P + 1, 2, dtype=F64))
    with pytest.raises(InputError, match="P ="):
        engine.quadratic_forms(torch.ones(P, 2, 1, dtype=F64))
    with pytest.raises(InputError, match=r"shape \(3,\)"):
        hutchinson_trace(lambda V: V, P, num_probes=3, quadratic_forms=lambda Z: Z.sum(), dtype=F64)
    with pytest.raises(InputError, match="list"):
        hutchinson_trace(lambda V: V, P, num_probes=3, quadratic_forms=lambda Z: [0.0] * 3, dtype=F64)
