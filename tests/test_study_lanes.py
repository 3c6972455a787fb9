"""The study's parts side by side (two lanes, one thread each) against the same study one part after the other."""

from __future__ import annotations

import numpy as np
import torch

from fisherlab.study import StudyConfig, load_model_and_data, part_lanes, run_study

#: Every part, a reconstructed network's rule measured and trained (sngd-kfac), KFAC in the geometry.
OPTIONS = dict(data="synthetic-multiclass", n_samples=48, rules=["gd", "ngd", "kfac", "sngd-kfac"],
               damping=[1e-3, 1e-2, 1e-1], steps=3, every=1, trajectory_rules=["gd", "ngd", "kfac"],
               geometry_structures=["block", "kfac", "diag"], spectrum_kinds=["true", "mc", "empirical"])


def test_part_lanes():
    assert part_lanes(["trajectory", "geometry", "spectrum"]) == [["trajectory", "spectrum"], ["geometry"]]
    assert part_lanes(["geometry", "spectrum"]) == [["spectrum"], ["geometry"]]
    assert part_lanes(["trajectory", "spectrum"]) == [] and part_lanes(["geometry"]) == [] and part_lanes([]) == []


def test_side_by_side_computes_what_one_after_the_other_does(tmp_path):
    """Two threads: the fidelity part alone, then trajectory + spectrum beside the geometry (each part's log line
    says so); one thread: every part in turn (the reference). Every variable agrees to round-off (the summation
    order of one thread against two), the trajectory's phases are its own, and the model is not changed."""
    cfg = StudyConfig(**OPTIONS)
    threads = torch.get_num_threads()
    messages: list[str] = []
    try:
        torch.set_num_threads(2)
        model_and_data = load_model_and_data(cfg)
        before = {k: v.clone() for k, v in model_and_data[0].state_dict().items()}
        lanes = run_study(cfg, tmp_path / "lanes", progress=False, log=messages.append,
                          model_and_data=model_and_data)
        assert all(torch.equal(v, before[k]) for k, v in model_and_data[0].state_dict().items())
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        one = run_study(cfg, tmp_path / "one", progress=False, log=lambda message: None)
    finally:
        torch.set_num_threads(threads)
    done = {m.split("]")[0][1:]: m for m in messages if " done in " in m}
    assert "all threads" in done["fidelity"]
    assert "one thread beside geometry" in done["trajectory"] and "one thread beside geometry" in done["spectrum"]
    assert "one thread beside trajectory, spectrum" in done["geometry"]
    assert list(lanes) == list(one) == list(cfg.parts)
    for part, ds in one.items():
        for name, var in ds.data_vars.items():
            a, b = var.values, lanes[part][name].values
            if a.dtype.kind not in "fc":
                assert np.array_equal(a, b), (part, name)
                continue
            assert np.array_equal(np.isfinite(a), np.isfinite(b)), (part, name)
            ok = np.isfinite(a)
            scale = max(np.abs(a[ok]).max(initial=0.0), 1e-300)
            assert np.abs(a[ok] - b[ok]).max(initial=0.0) <= 1e-9 * scale + 1e-12, (part, name)  # residuals ≈ 1e-15
    assert not any(key.startswith(("geometry", "eigenvalues")) for key in lanes["trajectory"].attrs["timings"])


def test_the_study_leaves_the_objects_it_started_with_out_of_the_collectors_reach(tmp_path):
    """While the parts run, what existed before is frozen (gc.get_freeze_count() > 0); after, nothing is, and a
    heap frozen by the caller stays frozen, no more and no less."""
    import gc

    cfg = StudyConfig(**{**OPTIONS, "parts": ["spectrum"], "spectrum_kinds": ["true"]})
    model_and_data = load_model_and_data(cfg)
    during: list[int] = []
    assert gc.get_freeze_count() == 0
    run_study(cfg, tmp_path / "a", progress=False, log=lambda message: None, model_and_data=model_and_data,
              saved=lambda path: during.append(gc.get_freeze_count()))
    assert during[0] > 0 and gc.get_freeze_count() == 0
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        run_study(cfg, tmp_path / "b", progress=False, log=lambda message: None, model_and_data=model_and_data,
                  saved=lambda path: during.append(gc.get_freeze_count()))
        assert during[1] == frozen == gc.get_freeze_count()
    finally:
        gc.unfreeze()
