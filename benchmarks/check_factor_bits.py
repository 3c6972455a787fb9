"""Whether a change leaves the KFAC factors bit for bit as they were: this working tree against a git revision.

For bench_peers' models — the GPT 1M (32 × 64 tokens), the MLP 64-1024-1024-10 and the CNN (32, 64) on N = 512
digits, float32 — on 1 and 2 intra-op threads, for the empirical and the Monte-Carlo Fisher (seed 0), under
"expand" and "reduce": every layer's A and S and every exact block (the GPT's LayerNorms), computed by the baseline
(``--baseline``, default HEAD, exported by ``git archive``) and by the candidate (the working tree, or with
``--paths`` the baseline with the working tree's versions of those files), each in a process of its own, then
compared with ``torch.equal``; the candidate's matrices are also checked for exact symmetry. Prints the number of
tensors, those that differ (with their largest difference) and those not symmetric; exit status 1 if any.

    python benchmarks/check_factor_bits.py [--baseline HEAD] [--paths fisherlab/layers.py,...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _common import PATHS_HELP, revision_trees

DUMP = r"""
import os, sys, warnings
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
root, out = sys.argv[1], sys.argv[2]
sys.path[:0] = [root, os.path.join(root, "benchmarks")]
warnings.filterwarnings("ignore")
import torch
import fisherlab
from bench_peers import engine, problem
from fisherlab.engine import FisherEngine
from fisherlab.structures.kfac import KFACFisher
assert fisherlab.__file__.startswith(root), (fisherlab.__file__, root)
found = {}
for name in ("gpt", "mlp", "cnn"):
    p = problem(name, 512, False, torch.device("cpu"))
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for kind in ("empirical", "mc"):
            eng = engine(p, kind) if kind == "empirical" else FisherEngine(
                p.model, (p.X, p.y), "categorical", kind=kind, dtype=torch.float32, device=p.X.device,
                progress=False, seed=0)
            for approx in ("expand", "reduce"):
                K = KFACFisher.from_engine(eng, approx=approx)
                for path, f in K.factors.items():
                    found[f"{name} {threads} {kind} {approx} {path} A"] = f.A
                    found[f"{name} {threads} {kind} {approx} {path} S"] = f.S
                for path, B in K.exact_blocks.items():
                    found[f"{name} {threads} {kind} {approx} {path} block"] = B
torch.save(found, out)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="HEAD")
    parser.add_argument("--paths", default="", help=PATHS_HELP)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base, candidate = revision_trees(Path(tmp), args.baseline, args.paths)
        results = []
        for k, root in enumerate((base, candidate)):
            out = Path(tmp) / f"{k}.pt"
            subprocess.run([sys.executable, "-c", DUMP, str(root), str(out)], cwd=root, check=True)
            results.append(torch.load(out))
    before, after = results
    if before.keys() != after.keys():
        sys.exit(f"different tensors: {sorted(before.keys() ^ after.keys())}")
    differ = [k for k in before if not torch.equal(before[k], after[k])]
    asymmetric = [k for k, M in after.items() if M.dim() == 2 and not torch.equal(M, M.T)]
    print(f"{args.baseline} against {args.paths or 'the working tree'}: {len(before)} tensors (GPT/MLP/CNN, 1 and "
          f"2 threads, empirical/mc, expand/reduce); {len(differ)} differ; {len(asymmetric)} not exactly symmetric")
    for k in differ:
        print(f"  differs: {k} (largest difference {(before[k] - after[k]).abs().max().item():.3g})")
    for k in asymmetric:
        print(f"  not symmetric: {k}")
    sys.exit(1 if differ or asymmetric else 0)


if __name__ == "__main__":
    main()
