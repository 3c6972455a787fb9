"""Tests of fisherlab.data: shapes, dtypes, determinism, standardization, file loaders, registry."""

from __future__ import annotations

import gzip
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from fisherlab import data as D
from fisherlab.errors import InputError

# ------------------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_flat():
    return D.load_digits()


@pytest.fixture(scope="module")
def digits_image():
    return D.load_digits(layout="image")


@pytest.fixture(scope="module")
def mnist1d_all():
    return {
        layout: D.load_mnist1d(n_samples=300, layout=layout) for layout in ("flat", "channels", "sequence")
    }


def _rng_states():
    return torch.get_rng_state().clone(), np.random.get_state()[1].copy(), random.getstate()


def _assert_rng_unchanged(before):
    t, n, p = before
    assert torch.equal(torch.get_rng_state(), t)
    assert np.array_equal(np.random.get_state()[1], n)
    assert random.getstate() == p


# ------------------------------------------------------------------------------------------------------------
# digits
# ------------------------------------------------------------------------------------------------------------


def test_digits_shapes_dtypes_labels(digits_flat, digits_image):
    d = digits_flat
    assert d.name == "digits" and d.task == "multiclass" and d.n_outputs == 10
    assert d.n_train + d.n_test == 1797
    assert d.X_train.shape == (d.n_train, 64) and d.X_test.shape == (d.n_test, 64)
    assert d.input_shape == (64,)
    assert d.X_train.dtype == torch.float32
    assert d.y_train.dtype == torch.int64 and d.y_train.shape == (d.n_train,)
    assert int(d.y_train.min()) == 0 and int(d.y_train.max()) == 9
    assert set(d.y_test.tolist()) == set(range(10))
    assert abs(d.n_test - 0.25 * 1797) <= 10

    im = digits_image
    assert im.input_shape == (1, 8, 8) and im.X_train.shape == (im.n_train, 1, 8, 8)
    assert im.meta["layout"] == "image" and d.meta["layout"] == "flat"
    # same split and same values, only reshaped
    torch.testing.assert_close(im.X_train.reshape(im.n_train, 64), d.X_train, rtol=0, atol=0)
    assert torch.equal(im.y_test, d.y_test)


def test_digits_stratified_and_standardized_with_train_stats(digits_flat):
    d = digits_flat
    train_counts = torch.bincount(d.y_train, minlength=10).double()
    test_counts = torch.bincount(d.y_test, minlength=10).double()
    frac = test_counts / (train_counts + test_counts)
    assert torch.all((frac - 0.25).abs() < 0.01)
    X = d.X_train.double()
    assert X.mean(0).abs().max() < 1e-5  # per-pixel train mean is 0
    std = X.std(0, unbiased=False)
    assert ((std - 1).abs() < 1e-4).sum() >= 50  # pixels above the floor have unit train std
    assert torch.all(std <= 1 + 1e-4)  # floored pixels have std below 1
    assert X.abs().max() < 50 and d.X_test.abs().max() < 50
    assert d.X_test.double().mean(0).abs().max() > 1e-3  # test split is not re-standardized on itself


def test_digits_deterministic_and_seed_dependent(digits_flat):
    before = _rng_states()
    again = D.load_digits(seed=0)
    _assert_rng_unchanged(before)
    assert torch.equal(again.X_train, digits_flat.X_train) and torch.equal(again.y_test, digits_flat.y_test)
    other = D.load_digits(seed=1)
    assert not torch.equal(other.y_train, digits_flat.y_train)


def test_digits_table_is_sklearns_without_importing_it():
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    table = D._digits_table()
    assert table.dtype == np.float64 and table.shape == (1797, 65)
    assert np.array_equal(table[:, :-1], bunch.data) and np.array_equal(table[:, -1].astype(np.int64), bunch.target)
    code = "import sys; from fisherlab import data; data.load_digits(); print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_digits_table_missing_sklearn(monkeypatch):
    monkeypatch.setattr(D.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match="scikit-learn"):
        D.load_digits()


def test_digits_dtype_and_errors():
    d64 = D.load_digits(dtype=torch.float64, test_fraction=0.5)
    assert d64.X_train.dtype == torch.float64 and d64.y_train.dtype == torch.int64
    assert abs(d64.n_test - d64.n_train) <= 10
    with pytest.raises(InputError, match="layout"):
        D.load_digits(layout="sequence")
    with pytest.raises(InputError, match="test_fraction"):
        D.load_digits(test_fraction=1.0)
    with pytest.raises(InputError, match="dtype"):
        D.load_digits(dtype=torch.int32)


# ------------------------------------------------------------------------------------------------------------
# mnist1d
# ------------------------------------------------------------------------------------------------------------


def test_mnist1d_layouts(mnist1d_all):
    flat, ch, seq = mnist1d_all["flat"], mnist1d_all["channels"], mnist1d_all["sequence"]
    assert flat.n_train + flat.n_test == 300
    assert flat.n_test == 60
    assert flat.input_shape == (40,) and flat.X_train.shape == (flat.n_train, 40)
    assert ch.input_shape == (1, 40) and ch.X_test.shape == (ch.n_test, 1, 40)
    assert seq.input_shape == (40, 1) and seq.X_test.shape == (seq.n_test, 40, 1)
    for d in (flat, ch, seq):
        assert d.name == "mnist1d" and d.task == "multiclass" and d.n_outputs == 10
        assert d.X_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
        assert 0 <= int(d.y_train.min()) and int(d.y_train.max()) <= 9
        torch.testing.assert_close(d.X_train.reshape(d.n_train, 40), flat.X_train, rtol=0, atol=0)
    assert set(flat.y_train.tolist()) == set(range(10))
    X = flat.X_train.double()
    assert abs(float(X.mean())) < 1e-6 and abs(float(X.std(unbiased=False)) - 1) < 1e-5


def test_mnist1d_deterministic_seeded_and_rng_clean(mnist1d_all):
    before = _rng_states()
    again = D.load_mnist1d(n_samples=300, layout="flat")
    _assert_rng_unchanged(before)
    assert torch.equal(again.X_train, mnist1d_all["flat"].X_train)
    other = D.load_mnist1d(n_samples=300, seed=1, layout="flat")
    assert not torch.equal(other.X_train, again.X_train)


def test_mnist1d_rounds_and_validates():
    d = D.load_mnist1d(n_samples=105, test_fraction=0.5, dtype=torch.float64)
    assert d.n_train + d.n_test == 100 and d.meta["n_requested"] == 105
    assert d.X_train.dtype == torch.float64
    with pytest.raises(InputError, match="n_samples"):
        D.load_mnist1d(n_samples=5)
    with pytest.raises(InputError, match="layout"):
        D.load_mnist1d(n_samples=100, layout="image")


# ------------------------------------------------------------------------------------------------------------
# synthetic
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "n_outputs", "y_shape_tail", "y_dtype"),
    [
        ("regression", 3, (3,), torch.float32),
        ("binary", None, (1,), torch.float32),
        ("multiclass", 4, (), torch.int64),
    ],
)
def test_synthetic_tasks(task, n_outputs, y_shape_tail, y_dtype):
    before = _rng_states()
    d = D.make_synthetic(task, n_samples=200, n_features=6, n_outputs=n_outputs, seed=3)
    _assert_rng_unchanged(before)
    assert d.name == f"synthetic-{task}" and d.task == task
    assert d.n_train == 150 and d.n_test == 50
    assert d.input_shape == (6,) and d.X_train.shape == (150, 6) and d.X_train.dtype == torch.float32
    assert d.y_train.shape == (150, *y_shape_tail) and d.y_train.dtype == y_dtype
    assert d.n_outputs == (n_outputs or 1)
    if task == "binary":
        assert set(d.y_train.flatten().tolist()) == {0.0, 1.0}
    if task == "multiclass":
        assert set(d.y_train.tolist()) == set(range(4))
    again = D.make_synthetic(task, n_samples=200, n_features=6, n_outputs=n_outputs, seed=3)
    assert torch.equal(again.X_train, d.X_train) and torch.equal(again.y_test, d.y_test)
    other = D.make_synthetic(task, n_samples=200, n_features=6, n_outputs=n_outputs, seed=4)
    assert not torch.equal(other.X_train, d.X_train)


def test_synthetic_regression_is_linear_plus_noise():
    d = D.make_synthetic("regression", n_samples=2000, n_features=5, noise=0.1, dtype=torch.float64)
    X, y = d.X_train, d.y_train
    W = torch.linalg.lstsq(X, y).solution
    resid = y - X @ W
    assert abs(float(resid.std()) - 0.1) < 0.01


def test_synthetic_defaults_and_errors():
    assert D.make_synthetic("multiclass").n_outputs == 3
    assert D.make_synthetic("regression").y_train.shape[1] == 1
    with pytest.raises(InputError, match="valid tasks"):
        D.make_synthetic("ranking")
    with pytest.raises(InputError, match="n_outputs=1"):
        D.make_synthetic("binary", n_outputs=2)
    with pytest.raises(InputError, match="n_outputs >= 2"):
        D.make_synthetic("multiclass", n_outputs=1)
    with pytest.raises(InputError, match="both splits"):
        D.make_synthetic("regression", n_samples=3, test_fraction=0.1)
    with pytest.raises(InputError, match="noise"):
        D.make_synthetic("regression", noise=-1.0)


# ------------------------------------------------------------------------------------------------------------
# SplitData
# ------------------------------------------------------------------------------------------------------------


def test_splitdata_to_and_subset():
    mc = D.make_synthetic("multiclass", n_samples=40)
    mc64 = mc.to(dtype=torch.float64)
    assert mc64.X_train.dtype == torch.float64 and mc64.y_train.dtype == torch.int64
    assert mc.X_train.dtype == torch.float32  # original untouched
    assert mc64.meta == mc.meta and mc64.meta is not mc.meta
    b64 = D.make_synthetic("binary", n_samples=40).to("cpu", torch.float64)
    assert b64.y_test.dtype == torch.float64
    with pytest.raises(InputError, match="floating"):
        mc.to(dtype=torch.int32)
    sub = mc.train_subset(7)
    assert sub.n_train == 7 and sub.n_test == mc.n_test and sub.meta["train_subset"] == 7
    assert torch.equal(sub.X_train, mc.X_train[:7])
    with pytest.raises(InputError, match="train_subset"):
        mc.train_subset(0)
    with pytest.raises(InputError, match="train_subset"):
        mc.train_subset(mc.n_train + 1)


def test_splitdata_validates():
    X = torch.zeros(4, 3)
    with pytest.raises(InputError, match="task"):
        D.SplitData(
            X, torch.zeros(4, dtype=torch.int64), X, torch.zeros(4, dtype=torch.int64), "x", "rank", 2, (3,)
        )
    with pytest.raises(InputError, match="samples"):
        D.SplitData(
            X,
            torch.zeros(3, dtype=torch.int64),
            X,
            torch.zeros(4, dtype=torch.int64),
            "x",
            "multiclass",
            2,
            (3,),
        )
    with pytest.raises(InputError, match="int64"):
        D.SplitData(X, torch.zeros(4), X, torch.zeros(4), "x", "multiclass", 2, (3,))
    with pytest.raises(InputError, match="input_shape"):
        D.SplitData(X, torch.zeros(4, 1), X, torch.zeros(4, 1), "x", "binary", 1, (4,))


# ------------------------------------------------------------------------------------------------------------
# MNIST IDX files
# ------------------------------------------------------------------------------------------------------------


def _write_idx(path, array, gz=False, magic=None):
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = (magic if magic is not None else 0x0800 + array.ndim).to_bytes(4, "big")
    header += b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    payload = header + array.tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)


def _tiny_mnist(tmp_path, gz):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, size=(12, 5, 4)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, size=12),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(6, 5, 4)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, size=6),
    }
    for name, arr in arrays.items():
        _write_idx(tmp_path / name, arr, gz=gz)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_round_trip(tmp_path, gz):
    arrays = _tiny_mnist(tmp_path, gz)
    d = D.load_mnist_idx(tmp_path, dtype=torch.float64, layout="image")
    assert d.name == "mnist" and d.task == "multiclass" and d.n_outputs == 10
    assert d.input_shape == (1, 5, 4) and d.X_train.shape == (12, 1, 5, 4) and d.X_test.shape == (6, 1, 5, 4)
    assert np.array_equal(d.y_train.numpy(), arrays["train-labels-idx1-ubyte"])
    assert np.array_equal(d.y_test.numpy(), arrays["t10k-labels-idx1-ubyte"])
    tr = arrays["train-images-idx3-ubyte"] / 255.0
    te = arrays["t10k-images-idx3-ubyte"] / 255.0
    mean, std = tr.mean(), tr.std()
    np.testing.assert_allclose(d.X_train.numpy()[:, 0], (tr - mean) / std, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(d.X_test.numpy()[:, 0], (te - mean) / std, rtol=1e-12, atol=1e-12)

    flat = D.load("mnist", directory=tmp_path, limit=5)
    assert flat.input_shape == (20,) and flat.n_train == 5 and flat.n_test == 5
    assert flat.X_train.dtype == torch.float32


def test_mnist_idx_errors(tmp_path):
    _tiny_mnist(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        D.load_mnist_idx(tmp_path)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(6), magic=0x00000803)
    with pytest.raises(InputError, match="magic"):
        D.load_mnist_idx(tmp_path)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(5))
    with pytest.raises(InputError, match="5 labels"):
        D.load_mnist_idx(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(
        (0x801).to_bytes(4, "big") + (9).to_bytes(4, "big") + b"\0"
    )
    with pytest.raises(InputError, match="declares"):
        D.load_mnist_idx(tmp_path)


# ------------------------------------------------------------------------------------------------------------
# CIFAR-10 pickles
# ------------------------------------------------------------------------------------------------------------


def _tiny_cifar(directory, n_per_batch=3):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072)).astype(np.uint8)
        labels = rng.integers(0, 10, size=n_per_batch).tolist()
        with open(directory / name, "wb") as fh:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, fh)
        written[name] = (data, labels)
    return written


def test_cifar10_round_trip(tmp_path):
    written = _tiny_cifar(tmp_path / "cifar-10-batches-py")
    d = D.load_cifar10(tmp_path, dtype=torch.float64)  # the parent folder is accepted too
    assert d.name == "cifar10" and d.n_outputs == 10 and d.input_shape == (3, 32, 32)
    assert d.X_train.shape == (15, 3, 32, 32) and d.X_test.shape == (3, 3, 32, 32)
    train = (
        np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32) / 255.0
    )
    labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert d.y_train.tolist() == labels and d.y_test.tolist() == written["test_batch"][1]
    mean = train.mean(axis=(0, 2, 3), keepdims=True)
    std = train.std(axis=(0, 2, 3), keepdims=True)
    np.testing.assert_allclose(d.X_train.numpy(), (train - mean) / std, rtol=1e-12, atol=1e-12)
    per_channel = d.X_train.mean(dim=(0, 2, 3))
    assert per_channel.abs().max() < 1e-10
    test = written["test_batch"][0].reshape(-1, 3, 32, 32) / 255.0
    np.testing.assert_allclose(d.X_test.numpy(), (test - mean) / std, rtol=1e-12, atol=1e-12)

    flat = D.load("cifar10", directory=tmp_path / "cifar-10-batches-py", layout="flat", limit=4)
    assert flat.input_shape == (3072,) and flat.n_train == 4 and flat.n_test == 3


def test_cifar10_missing_file(tmp_path):
    _tiny_cifar(tmp_path, n_per_batch=2)
    (tmp_path / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch"):
        D.load_cifar10(tmp_path)
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        D.load_cifar10(tmp_path / "empty")


# ------------------------------------------------------------------------------------------------------------
# token sequences: the sort language-modelling task and local text
# ------------------------------------------------------------------------------------------------------------


def test_sort_lm_targets_are_the_sorted_prompt_and_the_prompt_is_masked():
    before = _rng_states()
    d = D.make_sort_lm(40, length=4, n_values=5, seed=3)
    _assert_rng_unchanged(before)
    summary = (d.name, d.task, d.n_outputs, d.input_shape, d.n_train, d.n_test)
    assert summary == ("sort-lm", "multiclass", 6, (8,), 30, 10)
    assert d.meta["vocab"] == 6 and d.meta["layout"] == "tokens" and d.meta["targets_per_sequence"] == 4
    for X, y in ((d.X_train, d.y_train), (d.X_test, d.y_test)):
        assert X.dtype == y.dtype == torch.int64 and X.shape == y.shape
        for xs, ys in zip(X.tolist(), y.tolist(), strict=True):
            prompt = xs[:4]
            assert all(0 <= a < 5 for a in prompt) and xs[4] == 5  # values, then SEP
            assert ys[:4] == [D.IGNORE_INDEX] * 4 and ys[4:] == sorted(prompt)  # plain Python sort
            assert xs[5:] == ys[4:7]  # teacher forcing: the input at t + 1 is the target at t
    # the ideal model (probability 1 on the answer) has loss 0 on the unmasked tokens; uniform guessing ln V
    oracle = torch.nn.functional.one_hot(d.y_train.clamp_min(0), 6).double() * 1e4
    assert torch.nn.functional.cross_entropy(oracle.transpose(1, 2), d.y_train) == 0.0
    uniform = torch.nn.functional.cross_entropy(torch.zeros(d.n_train, 6, 8, dtype=torch.float64), d.y_train)
    assert float(uniform) == pytest.approx(np.log(6), rel=1e-12)
    again, other = D.make_sort_lm(40, length=4, n_values=5, seed=3), D.make_sort_lm(40, length=4, n_values=5, seed=4)
    assert torch.equal(again.X_train, d.X_train) and torch.equal(again.y_test, d.y_test)
    assert not torch.equal(other.X_train, d.X_train)
    with pytest.raises(InputError, match="n_values"):
        D.make_sort_lm(10, n_values=1)
    with pytest.raises(InputError, match="both splits"):
        D.make_sort_lm(3, test_fraction=0.1)


def test_load_text_windows_decode_back_to_the_file(tmp_path):
    text = "the quick brown fox jumps over the lazy dog\n" * 3  # 132 characters
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    d = D.load("text", path=path, seq_len=10, test_fraction=0.25)
    chars = d.meta["chars"]
    assert list(chars) == sorted(set(text)) and d.meta["vocab"] == d.n_outputs == len(chars) == 28
    assert (d.n_train, d.n_test, d.input_shape) == (10, 3, (10,))  # 131 // 10 = 13 windows, the last 3 for testing
    X, y = torch.cat([d.X_train, d.X_test]), torch.cat([d.y_train, d.y_test])
    decode = "".join(chars[i] for i in X.reshape(-1).tolist())
    assert decode == text[:130] and "".join(chars[i] for i in y.reshape(-1).tolist()) == text[1:131]
    assert "".join(chars[i] for i in d.X_test[0].tolist()) == text[100:110]  # the test text follows the training text
    assert D.load_text(path, seq_len=65, test_fraction=0.9).n_test == 1  # 131 // 65 = 2 windows: one each
    assert D.load_text(path, seq_len=10, test_fraction=0.01).n_test == 1
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "one.txt").write_text("aaaaaaaaaa")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        D.load_text(tmp_path / "missing.txt", seq_len=4)
    with pytest.raises(InputError, match="is empty"):
        D.load_text(tmp_path / "empty.txt", seq_len=4)
    with pytest.raises(InputError, match="single distinct character"):
        D.load_text(tmp_path / "one.txt", seq_len=4)
    with pytest.raises(InputError, match="holds 132 characters, fewer than the 133"):
        D.load_text(path, seq_len=66)
    with pytest.raises(InputError, match="not utf-8 text"):
        D.load_text(tmp_path / "latin1.txt", seq_len=2)
    assert D.load_text(tmp_path / "latin1.txt", seq_len=2, encoding="latin-1").meta["chars"][-1] == "\xe9"
    with pytest.raises(InputError, match="seq_len"):
        D.load_text(path, seq_len=0)


def test_splitdata_validates_token_data():
    X, y = torch.tensor([[0, 1, 2], [2, 1, 0]]), torch.tensor([[1, 2, -100], [1, 0, 2]])
    meta = {"layout": "tokens", "vocab": 3}

    def split(X=X, y=y, n_outputs=3, meta=meta):
        return D.SplitData(X, y, X, y, "t", "multiclass", n_outputs, (3,), meta)

    assert split().y_train.shape == (2, 3)
    with pytest.raises(InputError, match="token ids from 0 to 3"):
        split(X=torch.tensor([[0, 1, 3], [0, 0, 0]]))
    with pytest.raises(InputError, match="per-position target 3"):
        split(n_outputs=3, y=torch.tensor([[1, 3, -100], [0, 0, 0]]))
    with pytest.raises(InputError, match="per-position target -1"):
        split(y=torch.tensor([[1, -1, 0], [0, 0, 0]]))
    with pytest.raises(InputError, match=r"\(N, T\) = \(2, 3\)"):
        split(y=y[:, :2])
    with pytest.raises(InputError, match="meta\\['vocab'\\]"):
        split(meta={"layout": "tokens"})
    with pytest.raises(InputError, match=r"shape \(N,\) for multiclass"):
        D.SplitData(X.double(), y, X.double(), y, "t", "multiclass", 3, (3,), {})  # per position: token data only


# ------------------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------------------


def test_load_registry():
    assert D.DATASETS == (
        "digits",
        "mnist1d",
        "synthetic-regression",
        "synthetic-binary",
        "synthetic-multiclass",
        "mnist",
        "cifar10",
        "sort",
        "sort-lm",
        "text",
    )
    with pytest.raises(InputError) as info:
        D.load("imagenet")
    for name in D.DATASETS:
        assert name in str(info.value)
    with pytest.raises(InputError, match="directory"):
        D.load("mnist")
    with pytest.raises(InputError, match="directory"):
        D.load("cifar10")
    with pytest.raises(InputError, match="path="):
        D.load("text")
    with pytest.raises(InputError, match="unknown keyword"):
        D.load("digits", n_samples=10)
    with pytest.raises(InputError, match="task"):
        D.load("synthetic-binary", task="regression")
    d = D.load("synthetic-binary", n_samples=64, seed=2)
    assert d.task == "binary" and d.n_train + d.n_test == 64
    assert D.load("digits", layout="image").input_shape == (1, 8, 8)
    assert D.load("sort-lm", n_samples=8, length=2).input_shape == (4,)
    assert D.load("sort", n_samples=8, length=2).input_shape == (3,)


# ------------------------------------------------------------------------------------------------------------
# minibatches
# ------------------------------------------------------------------------------------------------------------


def test_iterate_minibatches():
    X = torch.arange(23.0).reshape(23, 1)
    y = torch.arange(23)
    before = _rng_states()
    batches = list(D.iterate_minibatches(X, y, 5, seed=7))
    _assert_rng_unchanged(before)
    assert [len(b[0]) for b in batches] == [5, 5, 5, 5, 3]
    seen = torch.cat([b[1] for b in batches])
    assert sorted(seen.tolist()) == list(range(23)) and seen.tolist() != list(range(23))
    for xb, yb in batches:
        assert torch.equal(xb[:, 0].long(), yb)
    again = torch.cat([b[1] for b in D.iterate_minibatches(X, y, 5, seed=7)])
    assert torch.equal(again, seen)
    other = torch.cat([b[1] for b in D.iterate_minibatches(X, y, 5, seed=8)])
    assert not torch.equal(other, seen)
    ordered = torch.cat([b[1] for b in D.iterate_minibatches(X, y, 5, seed=7, shuffle=False)])
    assert ordered.tolist() == list(range(23))
    assert [len(b[0]) for b in D.iterate_minibatches(X, y, 5, seed=0, drop_last=True)] == [5] * 4
    with pytest.raises(InputError, match="batch_size"):
        list(D.iterate_minibatches(X, y, 0, seed=0))
    with pytest.raises(InputError, match="samples"):
        list(D.iterate_minibatches(X, y[:-1], 4, seed=0))
