"""Continual-learning problems: sequences of tasks over one fixed pool of images.

A task holds the shared images ``x`` (N, D) plus, per seed, its labels ``y`` (S, N) and optionally
an input permutation ``perm`` (S, D). Every random choice of task ``t`` for seed ``s`` comes from a
generator seeded by ``(s, t)`` alone, so the seed fixes the task sequence and a resumed run sees
exactly the tasks it would have seen.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

PROBLEMS = (
    "random_label_mnist",
    "permuted_mnist",
    "label_shuffled_mnist",
    "random_label_cifar10",
    "label_shuffled_cifar10",
    "continual_imagenet32",
    "synthetic",
)

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR_MEAN, CIFAR_STD = 0.4734, 0.2516


DATA_DIR_ENV = "HESSRANK_DATA_DIR"
#: Seeds (of a run and of the image subset) lie in [0, SEED_LIMIT): ``task_generator`` mixes
#: (seed, task, stream) into one seed, which torch needs to fit in 64 bits.
SEED_LIMIT = 2**32


def image_side(problem: str) -> int | None:
    """The side in pixels of ``problem``'s square images, the largest average-pool factor it
    allows (None for ``synthetic``, which has no images)."""
    if problem == "synthetic":
        return None
    return 28 if problem.endswith("_mnist") else 32


class SetupError(Exception):
    """A run cannot start or resume: missing data, a damaged results file, a budget exceeded.

    The message is one line naming the file or setting at fault and what to do about it.
    """


def data_dir_of(given: str | os.PathLike | None = None) -> str:
    """The data folder: ``given`` (``--data-dir``), else ``$HESSRANK_DATA_DIR``, else
    ``~/.cache/hessrank/data``, with a leading ``~`` expanded (as a shell does only unquoted)."""
    folder = given or os.environ.get(DATA_DIR_ENV) or Path("~") / ".cache" / "hessrank" / "data"
    return str(Path(folder).expanduser())


def task_generator(seed: int, task: int, stream: int = 0) -> torch.Generator:
    """A generator determined by (seed, task, stream) only."""
    return torch.Generator().manual_seed(1_000_003 * seed + 7919 * task + stream)


@dataclass
class Task:
    """One task for S seeds at once; inputs are shared, labels and permutations are per seed."""

    x: torch.Tensor  # (N, D) float32
    y: torch.Tensor  # (S, N) int64
    num_classes: int
    perm: torch.Tensor | None = None  # (S, D) int64 input permutation, or None

    @property
    def num_samples(self) -> int:
        return self.x.shape[0]

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (S, B, D) and labels (S, B) for per-seed sample indices ``index`` (S, B)."""
        xb = self.x[index]
        if self.perm is not None:
            xb = torch.gather(xb, 2, self.perm[:, None, :].expand_as(xb))
        return xb, torch.gather(self.y, 1, index)

    def first(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` samples of the task for every seed."""
        n = min(n, self.num_samples)
        index = torch.arange(n).expand(self.y.shape[0], n)
        return self.batch(index)


@dataclass
class Pool:
    """The images a problem draws its tasks from."""

    x: torch.Tensor  # (N, D) float32, normalised
    labels: torch.Tensor  # (N,) int64 true labels
    num_classes: int


class Problem:
    """A task sequence: ``kind`` decides what changes from task to task."""

    def __init__(self, pool: Pool, kind: str, sequence_seed: int = 0) -> None:
        if kind not in ("random_label", "permuted", "label_shuffled", "class_pairs"):
            raise ValueError(f"unknown task kind {kind!r}")
        self.pool, self.kind, self.sequence_seed = pool, kind, sequence_seed

    @property
    def input_dim(self) -> int:
        return self.pool.x.shape[1]

    @property
    def num_classes(self) -> int:
        return 2 if self.kind == "class_pairs" else self.pool.num_classes

    def task(self, seeds: list[int], t: int) -> Task:
        """Task ``t`` for each seed in ``seeds``."""
        gens = [task_generator(s, t) for s in seeds]
        n, c = self.pool.x.shape[0], self.pool.num_classes
        if self.kind == "random_label":
            y = torch.stack([torch.randint(c, (n,), generator=g) for g in gens])
            return Task(self.pool.x, y, c)
        if self.kind == "permuted":
            perm = torch.stack([torch.randperm(self.input_dim, generator=g) for g in gens])
            y = self.pool.labels.expand(len(seeds), n).contiguous()
            return Task(self.pool.x, y, c, perm=perm)
        if self.kind == "label_shuffled":
            maps = torch.stack([torch.randperm(c, generator=g) for g in gens])
            return Task(self.pool.x, maps[:, self.pool.labels], c)
        return self._class_pair_task(len(seeds), t)

    def check_tasks(self, tasks: int, where: str = "") -> None:
        """Refuse, before anything is written, a sequence of ``tasks`` tasks one of which
        cannot be built (a class pair the pool holds too few images of).

        Raises:
            SetupError: naming the first such task, prefixed by ``where``.
        """
        if self.kind == "class_pairs":
            for t in range(tasks):
                self._class_pair(t, where)

    def _class_pair(self, t: int, where: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """Task ``t``'s pair of classes and the mask of the pool's images of either.

        Raises:
            SetupError: the pool holds fewer than 2 images of the pair.
        """
        c = self.pool.num_classes
        pair = torch.randperm(c, generator=task_generator(self.sequence_seed, t))[:2]
        keep = (self.pool.labels == pair[0]) | (self.pool.labels == pair[1])
        if int(keep.sum()) < 2:
            raise SetupError(
                f"{where}task {t + 1}: the pool of {self.pool.x.shape[0]:,} images holds "
                f"{int(keep.sum())} of the class pair {pair.tolist()} (of {c} classes): a "
                "class-pair problem needs a pool with images of every class, e.g. --num-samples "
                "100000")
        return pair, keep

    def _class_pair_task(self, num_seeds: int, t: int) -> Task:
        """Continual ImageNet (Dohare et al.): each task tells two classes apart.

        The seeds of a batch share their input images, so the pair sequence is fixed by
        ``sequence_seed`` (like the image subset), not by the run seed.
        """
        pair, keep = self._class_pair(t)
        y = (self.pool.labels[keep] == pair[1]).long()
        return Task(self.pool.x[keep], y.expand(num_seeds, -1).contiguous(), 2)


def _subset(n_total: int, n: int | None, subset_seed: int) -> torch.Tensor:
    """``n`` of the data set's ``n_total`` images drawn by ``subset_seed`` (all of them for
    ``n`` None or ``n_total``).

    Raises:
        SetupError: ``n`` above ``n_total`` (cut down to it without a word, config.json and
            every title had said the larger number, the subset seed had no effect; probe 227).
    """
    if n is not None and n > n_total:
        raise SetupError(f"--num-samples {n} is more than the data set's {n_total} training "
                         f"images: pass --num-samples {n_total} or fewer")
    if n is None or n == n_total:
        return torch.arange(n_total)
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(subset_seed))[:n]


def _pool_from_uint8(
    images: torch.Tensor, labels: torch.Tensor, mean: float, std: float, downsample: int,
    num_classes: int,
) -> Pool:
    """Normalise uint8 images (N, H, W[, C]), average-pool by ``downsample``, flatten;
    ``num_classes``: the whole data set's (a subset may lack its last class: 32 MNIST images
    without a 9 had made a 9-class problem; probe 227)."""
    x = images.float().div(255.0)
    x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)
    if downsample > 1:
        x = torch.nn.functional.avg_pool2d(x, downsample)
    x = (x - mean) / std
    return Pool(x.flatten(1).contiguous(), labels.long(), num_classes)


MNIST_TRAIN_IMAGES = Path("MNIST") / "raw" / "train-images-idx3-ubyte"


def load_mnist(
    data_dir: str, n: int | None, subset_seed: int, downsample: int = 1, download: bool = False
) -> Pool:
    """MNIST training images through torchvision.

    Raises:
        SetupError: MNIST is not under ``data_dir`` and ``download`` is off, or the download
            failed (offline).
    """
    from torchvision.datasets import MNIST

    expected = Path(data_dir) / MNIST_TRAIN_IMAGES
    if not download and not expected.exists():
        raise SetupError(
            f"MNIST not found: no {expected}; pass --data-dir (or set {DATA_DIR_ENV}) to a folder "
            "holding MNIST/raw, or add --download to fetch it with torchvision"
        )
    try:
        ds = MNIST(root=data_dir, train=True, download=download)
    except (RuntimeError, OSError) as err:  # torchvision's download failures (offline, HTTP)
        said = " ".join(str(err).split())  # torchvision's message spans lines (one per mirror)
        raise SetupError(
            (f"MNIST download into {data_dir} failed ({said})" if download else
             f"MNIST in {data_dir} is incomplete ({said}): MNIST/raw needs the four files "
             "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
             "t10k-labels-idx1-ubyte")
            + "; copy MNIST/raw there by hand and pass --data-dir") from None
    idx = _subset(len(ds.targets), n, subset_seed)
    return _pool_from_uint8(ds.data[idx], ds.targets[idx], MNIST_MEAN, MNIST_STD, downsample,
                            int(ds.targets.max()) + 1)


def load_cifar10(
    data_dir: str, n: int | None, subset_seed: int, downsample: int = 1, download: bool = False
) -> Pool:
    """CIFAR-10 training images; a clear error when they are not under ``data_dir``."""
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(root=data_dir, train=True, download=download)
    except (RuntimeError, OSError):
        raise SetupError(
            f"CIFAR-10 not found under {data_dir!r} (expected {data_dir}/cifar-10-batches-py). "
            "Pass --download to fetch it with torchvision, or --data-dir pointing at a copy."
        ) from None
    images, labels = torch.from_numpy(ds.data), torch.tensor(ds.targets)
    idx = _subset(len(labels), n, subset_seed)
    return _pool_from_uint8(images[idx], labels[idx], CIFAR_MEAN, CIFAR_STD, downsample,
                            int(labels.max()) + 1)


def load_imagenet32(data_dir: str, n: int | None, subset_seed: int, downsample: int = 1) -> Pool:
    """Downsampled ImageNet 32x32 (Chrabaszcz et al.) from ``Imagenet32_train_npz/*.npz``.

    No loader downloads it (it needs an image-net.org account); put the official npz batches
    (keys ``data`` (N, 3072) uint8 and ``labels`` 1-based) under ``data_dir/Imagenet32_train_npz``.
    """
    folder = Path(data_dir) / "Imagenet32_train_npz"
    files = sorted(folder.glob("*.npz"))
    if not files:
        raise SetupError(
            f"downsampled ImageNet not found: no .npz batches in {folder}. Download "
            "Imagenet32_train_npz from https://image-net.org/download-images (account needed) "
            "and unpack it there, or pass --data-dir."
        )
    data, labels = [], []
    for f in files:
        with np.load(f) as z:
            data.append(z["data"])
            labels.append(z["labels"])
    images = torch.from_numpy(np.concatenate(data)).view(-1, 3, 32, 32).permute(0, 2, 3, 1)
    targets = torch.from_numpy(np.concatenate(labels)).long() - 1
    idx = _subset(len(targets), n, subset_seed)
    return _pool_from_uint8(images[idx], targets[idx], 0.48, 0.25, downsample,
                            int(targets.max()) + 1)


def synthetic_pool(n: int, dim: int, num_classes: int, subset_seed: int) -> Pool:
    """Gaussian inputs with random labels: needs no data on disk (tests, dry runs)."""
    g = torch.Generator().manual_seed(subset_seed)
    return Pool(
        torch.randn(n, dim, generator=g), torch.randint(num_classes, (n,), generator=g), num_classes
    )


def make_problem(
    name: str,
    data_dir: str,
    num_samples: int | None,
    subset_seed: int = 0,
    downsample: int = 1,
    download: bool = False,
    synthetic_dim: int = 64,
) -> Problem:
    """Build a named problem (see ``PROBLEMS``)."""
    if name == "synthetic":
        pool = synthetic_pool(num_samples or 256, synthetic_dim, 10, subset_seed)
        return Problem(pool, "random_label")
    if name.endswith("_mnist"):
        pool = load_mnist(data_dir, num_samples, subset_seed, downsample, download=download)
    elif name.endswith("_cifar10"):
        pool = load_cifar10(data_dir, num_samples, subset_seed, downsample, download=download)
    elif name == "continual_imagenet32":
        pool = load_imagenet32(data_dir, num_samples, subset_seed, downsample)
        return Problem(pool, "class_pairs", sequence_seed=subset_seed)
    else:
        raise ValueError(f"unknown problem {name!r}; choose one of {PROBLEMS}")
    kind = name.rsplit("_", 1)[0]
    return Problem(pool, kind)
