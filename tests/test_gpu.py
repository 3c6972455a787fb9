"""CUDA: the engine and structures on a GPU equal the CPU float64 reference, and results stay on the device.

Every test is marked ``gpu`` and skipped cleanly (conftest.py) when ``torch.cuda.is_available()`` is False.
Tolerances: 1e-10 relative in float64; 1e-5 in float32 (an MLP, so no TF32 convolutions are involved).
"""

from __future__ import annotations

import copy

import pytest
import reference as ref
import torch

from fisherlab import fisher, structures
from fisherlab.engine import FisherEngine

pytestmark = pytest.mark.gpu

F64 = torch.float64
STRUCTURES = (("dense", {}), ("block", {"by": "layer"}), ("diag", {}), ("implicit", {}))


def on_cuda(p):
    """A CUDA copy of a problem's model and data (the shared CPU problem is left as it is)."""
    return copy.deepcopy(p.model).cuda(), p.X.cuda(), p.y.cuda()


@pytest.mark.parametrize("name", ["mlp", "cnn2d", "resnet_bn", "custom"])
@pytest.mark.parametrize("kind", ["true", "mc", "ggn"])
def test_cuda_matches_cpu_reference(problems, name, kind):
    p = problems(name)
    model, X, y = on_cuda(p)
    engine = FisherEngine(model, (X, y), p.likelihood, kind=kind, seed=2)
    labels = engine._labels.cpu() if engine._labels is not None else None
    expected = p.reference(kind, labels=labels)
    for structure, options in STRUCTURES:
        F = structures.build(structure, engine, **options)
        assert F.device.type == "cuda"
        dense = F.to_dense()
        assert dense.device.type == "cuda" and dense.dtype == F64
        assert F.diag().device.type == "cuda"
        v = torch.randn(F.shape[0], dtype=F64, device="cuda")
        assert (F @ v).device.type == "cuda"
        if structure == "dense":
            ref.assert_close(dense, expected, 1e-10, f"{name} {kind} dense on cuda")
        elif structure == "implicit":
            ref.assert_close(dense, expected, 1e-10, f"{name} {kind} implicit on cuda")
            ref.assert_close(F @ v, expected @ v.cpu(), 1e-10, f"{name} {kind} implicit matvec on cuda")
        else:
            ref.assert_close(F.diag(), expected.diagonal(), 1e-10, f"{name} {kind} {structure} diag on cuda")


def test_cpu_model_with_cuda_device(problems):
    p = problems("mlp")
    before = [t.clone() for t in p.model.parameters()]
    F = fisher(p.model, p.data, "categorical", device="cuda")
    assert F.to_dense().device.type == "cuda"
    ref.assert_close(F.to_dense(), p.reference("true"), 1e-10, "device='cuda'")
    assert all(t.device.type == "cpu" and torch.equal(t, b) for t, b in zip(p.model.parameters(), before, strict=True))


def test_cuda_float32(problems):
    p = problems("mlp")
    model, X, y = on_cuda(p)
    F = fisher(model, (X, y), "categorical", dtype=torch.float32)
    assert F.to_dense().dtype == torch.float32 and F.to_dense().device.type == "cuda"
    ref.assert_close(F.to_dense(), p.reference("true"), 1e-5, "float32 on cuda")


def test_cuda_solve_and_spectrum(problems):
    p = problems("custom")
    model, X, y = on_cuda(p)
    D = p.reference("true")
    lam = 1e-2 * float(D.diagonal().mean())
    g = torch.randn(D.shape[0], dtype=F64)
    expected = torch.linalg.solve(D + lam * torch.eye(D.shape[0], dtype=F64), g)
    for structure, tol in (("dense", 1e-10), ("implicit", 1e-6)):
        F = fisher(model, (X, y), p.likelihood, structure=structure)
        x = F.solve(g.cuda(), lam, tol=1e-10) if structure == "implicit" else F.solve(g.cuda(), lam)
        assert x.device.type == "cuda"
        ref.assert_close(x, expected, tol, f"{structure} solve on cuda")
    F = fisher(model, (X, y), p.likelihood)
    ref.assert_close(F.eigvalsh(), torch.linalg.eigvalsh(D), 1e-10, "eigvalsh on cuda")
    op = F.to_scipy()
    ref.assert_close(torch.as_tensor(op @ g.numpy()), D @ g, 1e-10, "to_scipy on cuda")
