"""Data sets of the ``curvfun`` command on tiny fixtures written here in the real formats."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from curvfun.__main__ import main
from curvfun.cli.data import (DataError, augment_images, load_cifar10, load_dataset, load_digits_data,
                              load_wikitext2, read_cifar_batch)

FAST = ["--no-progress", "--threads", "1", "--no-plots", "--mem-probe-steps", "0"]


# ----------------------------------------------------------------------------- fixtures

def write_cifar(root, n_train=12, n_test=8, seed=0):
    """CIFAR-10 python format: pickled dicts of b'data' uint8 [n, 3072] (R, G, B planes) and b'labels'."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    batches = {}
    for name, n in [(f"data_batch_{i}", n_train) for i in range(1, 6)] + [("test_batch", n_test)]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        with open(os.path.join(root, name), "wb") as fh:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [f"img{i}.png".encode() for i in range(n)]}, fh, protocol=2)
        batches[name] = (data, labels)
    return batches


TRAIN_TEXT = """
 = Valkyria Chronicles = 

 The game began development in 2010 . 
 It met with positive sales in Japan . 
 The game 's battle system was carried over . 
"""
VALID_TEXT = " The game began in Japan . \n"
TEST_TEXT = " The unseen battle began . \n The game . \n"


def write_wikitext(root, train=TRAIN_TEXT * 4, valid=VALID_TEXT * 3, test=TEST_TEXT * 3):
    os.makedirs(root, exist_ok=True)
    for name, text in (("wiki.train.tokens", train), ("wiki.valid.tokens", valid), ("wiki.test.tokens", test)):
        with open(os.path.join(root, name), "w", encoding="utf-8") as fh:
            fh.write(text)


# ----------------------------------------------------------------------------- digits

def test_digits_split_is_fixed_and_batches_are_a_function_of_seed_and_step():
    d = load_digits_data()
    assert d.x_train.shape == (1437, 1, 8, 8) and d.x_test.shape == (360, 1, 8, 8)
    assert 0 <= float(d.x_train.min()) and float(d.x_train.max()) <= 1
    assert torch.equal(load_digits_data().y_test, d.y_test)  # split independent of everything
    assert sorted(set(d.y_test.tolist())) == list(range(10))
    per_epoch = d.steps_per_epoch(64)
    assert per_epoch == 1437 // 64
    # one epoch visits distinct samples; the same (seed, step) gives the same batch
    seen = torch.cat([d.train_batch(s, 64, seed=3)[1] for s in range(per_epoch)])
    x0, _ = d.train_batch(5, 64, seed=3)
    assert torch.equal(x0, load_digits_data().train_batch(5, 64, seed=3)[0])
    assert not torch.equal(x0, d.train_batch(5, 64, seed=4)[0])
    assert len(seen) == per_epoch * 64
    # the next epoch is a different permutation
    assert not torch.equal(d.train_batch(0, 64, 3)[0], d.train_batch(per_epoch, 64, 3)[0])


def test_augmentation_is_a_padded_crop_and_optional_flip():
    d = load_digits_data()
    x = d.x_train[:16].double()
    g = torch.Generator().manual_seed(0)
    out = augment_images(x, g)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(len(x)):  # each output is one of the 3x3 crops of the padded image, maybe flipped
        crops = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(-1)) for c in crops), i
    assert not torch.equal(out, x)
    assert torch.equal(out, augment_images(x, torch.Generator().manual_seed(0)))


# ----------------------------------------------------------------------------- CIFAR-10

def test_cifar10_loads_the_python_pickle_format(tmp_path):
    batches = write_cifar(tmp_path)
    d = load_cifar10(str(tmp_path), augment=True)
    assert d.x_train.shape == (60, 3, 32, 32) and d.x_train.dtype == torch.uint8
    assert d.x_test.shape == (8, 3, 32, 32) and d.num_classes == 10
    data, labels = batches["data_batch_2"]
    # row layout: 1024 red, then 1024 green, then 1024 blue values, each plane row-major 32 x 32
    img = d.x_train[12 + 3]
    assert torch.equal(img[0].flatten(), torch.from_numpy(data[3, :1024]))
    assert torch.equal(img[2].flatten(), torch.from_numpy(data[3, 2048:]))
    assert d.y_train[12:24].tolist() == labels
    assert torch.equal(d.y_test, torch.tensor(batches["test_batch"][1]))
    x, y = d.train_batch(0, 5, seed=0)
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (5,)
    # normalised per channel: (v / 255 - mean) / std
    ref = (d.x_train[:1].float() / 255 - torch.tensor(d.mean).view(1, 3, 1, 1)) / torch.tensor(d.std).view(1, 3, 1, 1)
    assert torch.allclose(d.prepare(d.x_train[:1]), ref.float())
    # the release's own sub-folder is found too
    write_cifar(tmp_path / "parent" / "cifar-10-batches-py")
    assert load_dataset("cifar10", str(tmp_path / "parent")).x_train.shape == (60, 3, 32, 32)


def test_cifar10_missing_files_name_the_file_and_layout(tmp_path):
    with pytest.raises(DataError, match="cifar10 needs --data-dir"):
        load_cifar10(None)
    with pytest.raises(DataError, match="data directory not found: .*nowhere"):
        load_cifar10(str(tmp_path / "nowhere"))
    write_cifar(tmp_path)
    os.remove(tmp_path / "data_batch_3")
    with pytest.raises(DataError) as exc:
        load_cifar10(str(tmp_path))
    msg = str(exc.value)
    assert f"CIFAR-10 file not found: {tmp_path / 'data_batch_3'}" in msg
    assert "expected layout" in msg and "data_batch_1 ... DATA_DIR/data_batch_5 and DATA_DIR/test_batch" in msg


@pytest.mark.parametrize("case, needle", [
    ("garbage", "is not a readable python pickle"),
    ("no_labels", "must hold a dict with keys b'data' and b'labels'"),
    ("wrong_shape", "b'data' must be a uint8 array [n, 3072], got uint8 [4, 100]"),
    ("wrong_dtype", "b'data' must be a uint8 array [n, 3072], got float32"),
    ("label_count", "b'labels' must hold 4 labels"),
    ("label_range", "labels must be integers in 0..9"),
    ("code", "refusing to load"),
])
def test_cifar10_malformed_files_get_a_clear_error(tmp_path, case, needle):
    path = tmp_path / "test_batch"
    good = np.zeros((4, 3072), dtype=np.uint8)
    obj = {"no_labels": {b"data": good},
           "wrong_shape": {b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4},
           "wrong_dtype": {b"data": good.astype(np.float32), b"labels": [0] * 4},
           "label_count": {b"data": good, b"labels": [0] * 3},
           "label_range": {b"data": good, b"labels": [0, 1, 2, 10]},
           "code": os.system}.get(case)
    if case == "garbage":
        path.write_bytes(b"this is not a pickle")
    else:
        with open(path, "wb") as fh:
            pickle.dump(obj, fh)
    with pytest.raises(DataError) as exc:
        read_cifar_batch(str(path))
    assert needle in str(exc.value) and str(path) in str(exc.value)
    assert "expected layout" in str(exc.value)


# ----------------------------------------------------------------------------- WikiText-2

def test_wikitext2_vocabulary_eos_and_contiguous_batches(tmp_path):
    write_wikitext(tmp_path)
    d = load_wikitext2(str(tmp_path), seq_len=5)
    train_lines = (TRAIN_TEXT * 4).splitlines()
    assert len(d.train) == sum(len(l.split()) + 1 for l in train_lines)
    eos = d.vocab.index("<eos>")
    assert int((d.train == eos).sum()) == len(train_lines)  # one <eos> per line, empty lines too
    assert d.vocab[:2] == ["<unk>", "<eos>"] and len(set(d.vocab)) == len(d.vocab)
    words = [d.vocab[i] for i in d.train[:6]]
    assert words == ["<eos>", "=", "Valkyria", "Chronicles", "=", "<eos>"]
    # test words missing from the training vocabulary map to <unk>
    test_words = [d.vocab[i] for i in d.test[:6]]
    assert test_words == ["The", "<unk>", "battle", "began", ".", "<eos>"]
    # batches: rows of the stream, targets shifted by one, consecutive steps continue the rows
    x0, y0 = d.train_batch(0, batch_size=3, seed=0)
    x1, _ = d.train_batch(1, batch_size=3, seed=0)
    assert x0.shape == y0.shape == (3, 5)
    assert torch.equal(x0[:, 1:], y0[:, :-1]) and torch.equal(x1[:, 0], y0[:, -1])
    row_len = len(d.train) // 3
    assert torch.equal(x0[1], d.train[row_len:row_len + 5])
    chunks = (row_len - 1) // 5
    assert torch.equal(d.train_batch(chunks, 3, 0)[0], x0)  # wraps around
    (_, xtr, ytr), (_, xte, yte) = d.eval_sets(0, 2)
    assert xte.shape == (2, 5) and torch.equal(xte.flatten()[1:], yte.flatten()[:-1])


def test_wikitext2_missing_or_malformed_files(tmp_path):
    with pytest.raises(DataError, match="wikitext2 needs --data-dir"):
        load_wikitext2(None, 5)
    write_wikitext(tmp_path)
    os.remove(tmp_path / "wiki.valid.tokens")
    with pytest.raises(DataError) as exc:
        load_wikitext2(str(tmp_path), 5)
    assert f"WikiText-2 file not found: {tmp_path / 'wiki.valid.tokens'}" in str(exc.value)
    assert "DATA_DIR/wiki.train.tokens, DATA_DIR/wiki.valid.tokens and DATA_DIR/wiki.test.tokens" in str(exc.value)
    (tmp_path / "wiki.valid.tokens").write_bytes(b"\xff\xfe\x00 binary")
    with pytest.raises(DataError, match="wiki.valid.tokens is not UTF-8 text"):
        load_wikitext2(str(tmp_path), 5)
    (tmp_path / "wiki.valid.tokens").write_text("\n\n  \n")
    with pytest.raises(DataError, match="wiki.valid.tokens holds no tokens"):
        load_wikitext2(str(tmp_path), 5)


# ----------------------------------------------------------------------------- through the CLI

def test_cli_trains_on_cifar10_and_wikitext2_fixtures(tmp_path, capsys):
    write_cifar(tmp_path / "cifar")
    rc = main(["compare", "--data", "cifar10", "--data-dir", str(tmp_path / "cifar"), "--model", "resnet",
               "--augment", "--optimizers", "sgd,adam", "--steps", "2", "--batch-size", "8",
               "--out", str(tmp_path / "r1"), *FAST])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "test acc (%)" in out and "| adam" in out

    write_wikitext(tmp_path / "wt")
    rc = main(["compare", "--data", "wikitext2", "--data-dir", str(tmp_path / "wt"), "--model", "gpt",
               "--model-arg", "d_model=16", "--model-arg", "n_head=2", "--optimizers", "adam", "--steps", "3",
               "--batch-size", "2", "--seq-len", "8", "--out", str(tmp_path / "r2"), *FAST[:-2], "--plots"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "test ppl" in out
    assert (tmp_path / "r2" / "perplexity_vs_steps.png").read_bytes()[:4] == b"\x89PNG"
    import json
    res = json.loads((tmp_path / "r2" / "results.json").read_text())[0]
    vocab = len(load_wikitext2(str(tmp_path / "wt"), 8).vocab)
    assert 1 < res["test_perplexity"] < 3 * vocab  # near-uniform after 3 steps

    rc = main(["train", "--data", "cifar10", "--data-dir", str(tmp_path / "missing"), *FAST])
    _, err = capsys.readouterr()
    assert rc == 2 and "CIFAR-10 data directory not found" in err and "missing" in err
