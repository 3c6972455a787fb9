"""Data-parallel sums over torch.distributed (gloo, CPU): 2 and 3 ranks agree with one process to 1e-12 (float64).

One child of the ``spawner`` fixture (tests/conftest.py: forked from a process that imported torch and fisherlab once;
in a session of its own, killed with its ranks on a hard timeout) forks ranks 1 and 2 (each a process of its own, on
127.0.0.1 with gloo, free ports): the three serve both world sizes, a process group of 3 ranks, destroyed, then a new
one of ranks 0 and 1 (rank 2 exits). In each world every rank takes its :func:`fisherlab.distributed.shard` of N = 23
samples (not divisible by 2 or 3: unequal shards), computes every quantity, and rank 0 writes them to a file the test
compares with the single-process results computed here. Chunks of 5 samples, so shard boundaries fall inside chunks.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import traceback
from pathlib import Path

import pytest
import torch
from forked import Spawner
from torch import nn

from fisherlab.distributed import active_group, all_reduce_sum, sample_offset, shard
from fisherlab.errors import InputError

N, CHUNK, DAMPING = 23, 5, 0.1
TIMEOUT_S = 120


def problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A float64 MLP 5-7-3 (P = 66) and N categorical samples, the same in every process."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    X = torch.randn(N, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=gen)
    return model, X, y


def compute(X: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every data-parallel quantity on the data (X, y) (this rank's shard when torch.distributed is on)."""
    from fisherlab.engine import FisherEngine
    from fisherlab.linalg import slq_density
    from fisherlab.ngd import solve_ngd, solve_ngd_all
    from fisherlab.structures.block import BlockDiagonalFisher
    from fisherlab.structures.dense import DenseFisher
    from fisherlab.structures.diagonal import DiagonalFisher
    from fisherlab.structures.ekfac import EKFACFisher
    from fisherlab.structures.kfac import KFACFisher
    from fisherlab.structures.lowrank import LowRankFisher

    model = problem()[0]
    engine = FisherEngine(model, (X, y), "categorical", kind="true", chunk_size=CHUNK)
    P = engine.spec.dim
    V = torch.randn(P, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    loss, grad = engine.loss_and_gradient()
    out = {"num_samples": torch.tensor(float(engine.num_samples)), "loss": loss, "gradient": grad,
           "Fv": engine.matmat(V[:, 0]), "FV": engine.matmat(V), "quadratic_forms": engine.quadratic_forms(V),
           "dense": DenseFisher.from_engine(engine).matrix,
           "diag": DiagonalFisher.from_engine(engine).diagonal,
           "block": BlockDiagonalFisher.from_engine(engine).to_dense()}
    for p, f in KFACFisher.from_engine(engine).factors.items():
        out[f"kfac_A_{p}"], out[f"kfac_S_{p}"] = f.A, f.S
    for p, f in EKFACFisher.from_engine(engine).factors.items():
        out[f"ekfac_scaling_{p}"] = f.scaling
    out["ngd_cg"] = solve_ngd(engine, grad, DAMPING, solver="cg", cg_tol=1e-12)[0]
    out["ngd_cholesky"] = solve_ngd(engine, grad, DAMPING, solver="cholesky")[0]  # all-reduced UᵀU
    out["ngd_auto"] = solve_ngd(engine, grad, DAMPING)[0]  # Woodbury in one process, Cholesky under a group
    out["ngd_pcg_kfac"] = solve_ngd(engine, grad, DAMPING, solver="pcg-kfac", cg_tol=1e-12)[0]
    shifted = solve_ngd_all(engine, grad, [DAMPING, 10 * DAMPING], solver="multishift", cg_tol=1e-12)
    out["ngd_multishift"] = torch.stack([x for x, _ in shifted.values()], 1)
    low = LowRankFisher.from_engine(engine, rank=12, seed=3)
    out["lowrank"] = (low.U * low.eigenvalues) @ low.U.T
    out["slq_nodes"], out["slq_weights"] = slq_density(lambda v: engine.matmat(v), P, num_probes=2, num_steps=12,
                                                       seed=5, dtype=torch.float64)
    mc = FisherEngine(model, (X, y), "categorical", kind="mc", mc_samples=2, seed=7, chunk_size=CHUNK)
    out["mc_dense"] = DenseFisher.from_engine(mc).matrix
    out["mc_diag"] = DiagonalFisher.from_engine(mc).diagonal
    return out


def worker(rank: int, world: int, port: int, path: str) -> None:
    """One rank of a new default process group of ``world`` ranks: its shard, every quantity; rank 0 saves them."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        _, X, y = problem()
        ix = shard(N, rank, world)
        out = compute(X[ix.start: ix.stop], y[ix.start: ix.stop])
        if world == 3:  # an explicit process group of ranks 0 and 1 (every rank creates it); rank 2 idles
            from fisherlab.engine import FisherEngine
            from fisherlab.structures.dense import DenseFisher

            sub = dist.new_group([0, 1])
            if rank < 2:
                ix = shard(N, rank, 2)
                engine = FisherEngine(problem()[0], (X[ix.start: ix.stop], y[ix.start: ix.stop]), "categorical",
                                      kind="mc", mc_samples=2, seed=7, chunk_size=CHUNK, process_group=sub)
                out["subgroup_mc_dense"] = DenseFisher.from_engine(engine).matrix
                out["subgroup_gradient"] = engine.loss_and_gradient()[1]
            else:  # not a member: a named error, not a silent single-process run
                with pytest.raises(InputError, match="not a member"):
                    active_group(sub)
        if rank == 0:
            torch.save(out, path)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


WORLDS = (3, 2)


#: :func:`ranks` on the worlds ``sys.argv[1:]``, in a session of its own (its ranks are killed with it).
RANKS = "import os, sys; os.setsid(); from test_distributed import ranks; sys.exit(ranks(sys.argv[1:]))"


def run_worlds(spawner: Spawner, tmp_path: Path) -> dict[int, dict[str, torch.Tensor]]:
    """Run gloo ranks of :func:`worker` as processes, a world of each size of :data:`WORLDS` in turn (a process
    takes part in those it has a rank in); kill them all on failure or timeout. World size → rank 0's results."""
    paths = {world: tmp_path / f"world{world}.pt" for world in WORLDS}
    worlds = [f"{world}:{free_port()}:{paths[world]}" for world in WORLDS]
    proc = spawner.spawn(RANKS, *worlds, env={"MASTER_ADDR": "127.0.0.1"})
    try:
        log = "".join(proc.communicate(timeout=2 * TIMEOUT_S))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the forked ranks too
        proc.kill()
    assert proc.returncode == 0, log[-6000:]
    return {world: torch.load(path) for world, path in paths.items()}


def ranks(worlds: list[str]) -> int:
    """Fork ranks 1 .. max world size − 1 of ``worlds`` (``WORLD:PORT:PATH`` each), run rank 0 here; the exit code."""

    def run(rank: int) -> None:
        for spec in worlds:  # one world after another
            world, port, path = spec.split(":", 2)
            if rank < int(world):
                worker(rank, int(world), int(port), path)

    children = []
    for rank in range(1, max(int(spec.split(":")[0]) for spec in worlds)):
        if (pid := os.fork()) == 0:
            code = 0
            try:
                run(rank)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        children.append(pid)
    try:
        run(0)
    except BaseException:
        for pid in children:  # they would wait for rank 0 until the group's timeout
            os.kill(pid, signal.SIGKILL)
        raise
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
    print("ranks 1.. exited with", codes, flush=True)
    return int(any(codes))


@pytest.fixture(scope="module")
def distributed(spawner: Spawner, tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, torch.Tensor]]:
    return run_worlds(spawner, tmp_path_factory.mktemp("worlds"))


@pytest.fixture(scope="module")
def single() -> dict[str, torch.Tensor]:
    _, X, y = problem()
    return compute(X, y)


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b| (the scale of the quantity)."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_agree_with_one_process(world: int, single: dict[str, torch.Tensor],
                                      distributed: dict[int, dict[str, torch.Tensor]]) -> None:
    dist_out = distributed[world]
    if world == 3:
        single = {**single, "subgroup_mc_dense": single["mc_dense"], "subgroup_gradient": single["gradient"]}
    assert set(dist_out) == set(single)
    assert float(dist_out["num_samples"]) == N
    errors = {k: max_rel(dist_out[k], v) for k, v in single.items()}
    print(f"world {world}: max relative differences", {k: f"{e:.1e}" for k, e in errors.items()})
    bad = {k: e for k, e in errors.items() if not e <= 1e-12}
    assert not bad, bad


def test_single_process_references(single: dict[str, torch.Tensor]) -> None:
    """The single-process results the ranks are compared with are themselves right (brute force, float64)."""
    model, X, y = problem()
    params = dict(model.named_parameters())
    names = list(params)

    def loss_fn(*flat: torch.Tensor) -> torch.Tensor:
        z = torch.func.functional_call(model, dict(zip(names, flat, strict=True)), (X,))
        return nn.functional.cross_entropy(z, y)

    grads = torch.autograd.grad(loss_fn(*params.values()), list(params.values()))
    torch.testing.assert_close(single["gradient"], torch.cat([g.reshape(-1) for g in grads]), rtol=1e-12, atol=0)
    # the true Fisher by per-sample Jacobians and Λ = diag(p) − ppᵀ
    F = torch.zeros_like(single["dense"])
    for n in range(N):
        def f(*flat: torch.Tensor, n: int = n) -> torch.Tensor:
            return torch.func.functional_call(model, dict(zip(names, flat, strict=True)), (X[n: n + 1],))[0]
        J = torch.cat([j.reshape(3, -1) for j in torch.autograd.functional.jacobian(f, tuple(params.values()))], 1)
        p = torch.softmax(f(*params.values()), 0).detach()
        F += J.T @ (torch.diag(p) - torch.outer(p, p)) @ J / N
    torch.testing.assert_close(single["dense"], F, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(single["FV"][:, 0], single["Fv"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(single["diag"], F.diagonal(), rtol=1e-12, atol=1e-14)
    V = torch.randn(F.shape[0], 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(single["quadratic_forms"], torch.einsum("pk,pq,qk->k", V, F, V), rtol=1e-12, atol=0)
    eye = torch.eye(F.shape[0], dtype=F.dtype)
    solves = [(single["ngd_cg"], DAMPING), (single["ngd_pcg_kfac"], DAMPING),
              (single["ngd_multishift"][:, 0], DAMPING), (single["ngd_multishift"][:, 1], 10 * DAMPING)]
    for x, lam in solves:
        exact = torch.linalg.solve(F + lam * eye, single["gradient"])
        torch.testing.assert_close(x, exact, rtol=1e-9, atol=1e-9 * float(exact.abs().max()))


def test_shard_covers_the_data_in_order() -> None:
    for n, world in [(23, 2), (23, 3), (9, 3), (5, 5)]:
        parts = [shard(n, r, world) for r in range(world)]
        assert [i for part in parts for i in part] == list(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(InputError, match="cannot be shared"):
        shard(2, 0, 3)
    with pytest.raises(InputError, match="rank"):
        shard(5, 3, 3)


def test_no_process_group_is_the_single_process_path() -> None:
    assert active_group() is None
    t = torch.ones(3)
    all_reduce_sum([t], None)
    assert t.tolist() == [1.0, 1.0, 1.0]
    assert sample_offset(7, None) == (0, 7)
    with pytest.raises(InputError, match="not initialized"):
        active_group(object())

