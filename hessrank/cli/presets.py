"""Preset models and data sets for the CLI; the tests build the same objects in-process."""

from __future__ import annotations

import gzip
import importlib
import importlib.resources
import importlib.util
import os
import struct
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from hessrank.cli.errors import CliError

PRESETS = ("mlp", "cnn", "resnet")
DATASETS = ("auto", "digits", "mnist", "synthetic")
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
}
DEFAULT_WIDTH = {"mlp": 16, "cnn": 8, "resnet": 8}
DEFAULT_DEPTH = {"mlp": 2, "cnn": 2, "resnet": 2}
#: what ``--depth`` counts in each preset (the mlp's hidden layers may be none)
DEPTH_UNITS = {"mlp": "hidden layer", "cnn": "conv layer", "resnet": "residual block"}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
DATA_DIR_ENV = "HESSRANK_DATA_DIR"
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
NUM_CLASSES = 10


@dataclass(frozen=True)
class Dataset:
    """A classification batch: ``inputs`` (N, 1, H, W) standardised, ``targets`` (N,) int64."""

    name: str
    inputs: Tensor
    targets: Tensor
    num_classes: int
    source: str


def default_data_dir() -> Path | None:
    """The data directory from ``$HESSRANK_DATA_DIR``, if set, a leading ``~`` expanded (as
    the examples do; probe 160)."""
    value = os.environ.get(DATA_DIR_ENV)
    return Path(value).expanduser() if value else None


def _mnist_file(raw: Path, name: str) -> Path | None:
    """The file of ``name`` in ``raw``: as it is, else gzipped; None if neither."""
    return next((path for path in (raw / name, raw / f"{name}.gz") if path.is_file()), None)


def has_mnist(data_dir: Path | None) -> bool:
    """Whether ``data_dir`` holds MNIST's train set in the torchvision layout (``MNIST/raw/``,
    each file as it is or gzipped): what :func:`load_data` reads."""
    if data_dir is None:
        return False
    raw = data_dir / "MNIST" / "raw"
    return all(_mnist_file(raw, name) is not None for name in MNIST_FILES)


def resolve_data_name(name: str, data_dir: Path | None) -> str:
    """``auto`` is MNIST when the data directory has it, else the shipped digits."""
    if name == "auto":
        return "mnist" if has_mnist(data_dir) else "digits"
    return name


def _subset(num_available: int, samples: int, seed: int, what: str) -> Tensor:
    if samples < 2:
        raise CliError(f"--samples must be at least 2, got {samples}")
    if samples > num_available:
        raise CliError(f"--samples {samples} is more than the {num_available} images of {what}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_available, generator=generator)[:samples]


def _digits() -> tuple[Tensor, Tensor]:
    path = importlib.resources.files("hessrank") / "data" / "digits.npz"
    with path.open("rb") as handle, np.load(handle) as archive:
        images = torch.from_numpy(archive["images"].astype(np.float32) / 16.0)
        labels = torch.from_numpy(archive["labels"].astype(np.int64))
    return images, labels


def check_data(name: str, data_dir: Path | None) -> None:
    """What can be checked of data set ``name`` before reading it: MNIST's folder and files.

    Raises:
        CliError: no data directory, or one without MNIST's train files (named).
    """
    if resolve_data_name(name, data_dir) != "mnist":
        return
    if data_dir is None:
        raise CliError(
            f"--data mnist needs a data directory: pass --data-dir DIR or set ${DATA_DIR_ENV} "
            "(DIR/MNIST/raw/ in the torchvision layout)"
        )
    raw = data_dir / "MNIST" / "raw"
    missing = [name for name in MNIST_FILES if _mnist_file(raw, name) is None]
    if missing:
        raise CliError(
            f"no MNIST in {data_dir}: {raw} lacks {' and '.join(missing)} (or .gz) "
            "(torchvision layout); point --data-dir at the folder that holds MNIST/, "
            "or use --data digits"
        )


#: MNIST's train files, idx files of unsigned bytes, and their dimensions
_IDX_DIMS = {"train-images-idx3-ubyte": 3, "train-labels-idx1-ubyte": 1}


def _read_idx(path: Path, dims: int) -> np.ndarray:
    """The unsigned bytes of the idx file ``path`` (gzipped where it ends in ``.gz``), of
    ``dims`` dimensions, as torchvision reads them.

    Raises:
        ValueError: not such an idx file, or one cut short.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 + 4 * dims or data[:4] != bytes((0, 0, 8, dims)):
        raise ValueError(f"{path.name} does not begin as an idx file of {dims}-d bytes")
    shape = struct.unpack(f">{dims}I", data[4:4 + 4 * dims])
    size = int(np.prod(shape))
    if len(data) != 4 + 4 * dims + size:
        raise ValueError(f"{path.name} holds {len(data) - 4 - 4 * dims} bytes for {size}")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _mnist(data_dir: Path | None) -> tuple[Tensor, Tensor]:
    """MNIST's train set, read from its idx files (as they are or gzipped): the files
    :func:`has_mnist` checks, and only they (torchvision's reader had refused a folder without
    the test set's files, or with the gzipped files alone; probe 204)."""
    check_data("mnist", data_dir)
    assert data_dir is not None
    raw = data_dir / "MNIST" / "raw"
    try:
        images, labels = (_read_idx(_mnist_file(raw, name) or raw / name, dims)
                          for name, dims in _IDX_DIMS.items())
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images and {len(labels)} labels")
    except (ValueError, OSError, EOFError, zlib.error) as err:  # (gzip's: OSError, EOFError)
        # (a truncated download had ended in torchvision's bare AssertionError; probe 146)
        raise CliError(
            f"MNIST in {raw} could not be read ({type(err).__name__}: {err}): its files are "
            "not valid idx files (a truncated download?); download them again, or use --data "
            "digits") from err
    return (torch.from_numpy(images.astype(np.float32) / 255.0),
            torch.from_numpy(labels.astype(np.int64)))


def load_data(
    name: str,
    *,
    samples: int,
    seed: int,
    data_dir: Path | None = None,
    image_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Dataset:
    """A seeded subset of ``samples`` images, resized to ``image_size`` and standardised.

    ``digits`` ships with hessrank (8x8); ``mnist`` reads ``data_dir`` (28x28, resized to 8x8
    unless ``image_size`` says otherwise); ``synthetic`` is Gaussian inputs labelled by a random
    linear teacher.
    """
    name = resolve_data_name(name, data_dir)
    try:
        return _load_data(name, samples, seed, data_dir, image_size, dtype, device)
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not _out_of_memory(err):
            raise
        # (--image-size 100000, --data synthetic --samples 100000000 had ended in the
        # allocator's traceback; probe 204)
        size = image_size or 8
        raise CliError(f"--data {name} at --samples {samples} --image-size {size} does not fit "
                       f"in memory (its {samples:,} images of {size} x {size} could not be "
                       "allocated): choose a smaller --image-size or --samples") from err


def _out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is torch's refusal to allocate (CUDA's error, or the CPU allocator's)."""
    return isinstance(err, torch.OutOfMemoryError) or "allocate" in str(err)


def _load_data(name: str, samples: int, seed: int, data_dir: Path | None, image_size: int | None,
               dtype: torch.dtype, device: torch.device | str) -> Dataset:
    """:func:`load_data` of the data set ``name`` (``auto`` resolved)."""
    if name == "digits":
        images, labels = _digits()
        source = "UCI ML Optical Recognition of Handwritten Digits (shipped, CC BY 4.0)"
    elif name == "mnist":
        images, labels = _mnist(data_dir)
        source = f"MNIST train set from {data_dir}"
        image_size = 8 if image_size is None else image_size
    elif name == "synthetic":
        size = 8 if image_size is None else image_size
        generator = torch.Generator().manual_seed(seed)
        images = torch.randn(samples, size, size, generator=generator)
        teacher = torch.randn(size * size, NUM_CLASSES, generator=generator)
        labels = (images.flatten(1) @ teacher).argmax(dim=1)
        source = "Gaussian inputs, labels from a random linear teacher"
    else:
        raise CliError(f"unknown data set '{name}'; choose from {', '.join(DATASETS)}")
    index = _subset(len(images), samples, seed, name)
    x = images[index].unsqueeze(1)
    if image_size is not None and x.shape[-1] != image_size:
        if image_size < 1:
            raise CliError(f"--image-size must be positive, got {image_size}")
        x = nn.functional.adaptive_avg_pool2d(x, image_size)
    x = (x - x.mean()) / x.std().clamp_min(1e-8)
    return Dataset(
        name=name,
        inputs=x.to(device=device, dtype=dtype),
        targets=labels[index].to(device),
        num_classes=NUM_CLASSES,
        source=source,
    )


class _Block(nn.Module):
    """Residual block ``act(x + conv(act(conv(x))))`` without normalisation."""

    def __init__(self, channels: int, activation: type[nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act1 = activation()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act2 = activation()

    def forward(self, x: Tensor) -> Tensor:
        return self.act2(x + self.conv2(self.act1(self.conv1(x))))


def _preset(
    name: str, input_shape: tuple[int, ...], num_classes: int, act: type[nn.Module], w: int, d: int
) -> nn.Module:
    channels = input_shape[0]
    if name == "mlp":
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = int(np.prod(input_shape))
        for _ in range(d):
            layers += [nn.Linear(fan_in, w), act()]
            fan_in = w
        return nn.Sequential(*layers, nn.Linear(fan_in, num_classes))
    if name == "cnn":
        layers = []
        for _ in range(d):
            layers += [nn.Conv2d(channels, w, 3, padding=1), act()]
            channels = w
        pooled = [nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(w * 16, num_classes)]
        return nn.Sequential(*layers, *pooled)
    blocks = [_Block(w, act) for _ in range(d)]
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w, num_classes)]
    return nn.Sequential(nn.Conv2d(channels, w, 3, padding=1), act(), *blocks, *head)


def check_model_name(spec: str) -> None:
    """What can be checked of ``--model spec`` before importing it: a preset, or
    ``module:factory`` / ``path/file.py:factory`` with that file there.

    Raises:
        CliError: neither form, or no such file.
    """
    if spec in PRESETS:
        return
    module_name, _, attr = spec.rpartition(":")  # (a folder may hold one; probe 177)
    if not module_name or not attr:
        raise CliError(
            f"unknown model '{spec}'; use a preset ({', '.join(PRESETS)}) or package.module:factory"
        )
    if module_name.endswith(".py") and not Path(module_name).is_file():
        raise CliError(f"--model {spec}: no file {module_name}")


#: the module name under which each model file (resolved) is imported
_MODEL_FILES: dict[Path, str] = {}
#: modules that model files (their imports and factories) loaded from their folders, evicted
#: from ``sys.modules`` before the next model file is imported: a sibling ``helpers.py`` of
#: one folder had been reused for another folder's model, silently (probe 206)
_SIBLINGS: set[str] = set()


@contextmanager
def _in_its_folder(folder: str) -> Iterator[None]:
    """``folder`` first on ``sys.path`` in the block, as ``python file.py`` puts the script's
    folder (its sibling modules are found, wherever the command runs), taken off after; the
    modules the block loads from it, packages in it included, recorded in :data:`_SIBLINGS`
    (a sibling package's modules, one level down or more, had been reused; probe 208)."""
    before = set(sys.modules)
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        with suppress(ValueError):  # (the module may have taken it off itself)
            sys.path.remove(folder)
        for loaded in set(sys.modules) - before:
            origin = getattr(sys.modules.get(loaded), "__file__", None)
            if origin and Path(folder) in Path(origin).resolve().parents:
                _SIBLINGS.add(loaded)


def _import_file(path: Path) -> tuple[Any, str]:
    """The module of the file ``path`` and its folder: executed as ``python path`` runs it (its
    folder first on ``sys.path``), registered in ``sys.modules`` under a name of its own, which
    a ``@dataclass`` under ``from __future__ import annotations`` looks itself up by (it had
    failed with "'NoneType' object has no attribute '__dict__'"; probe 204)."""
    resolved = path.resolve()
    name = _MODEL_FILES.setdefault(resolved, f"_hessrank_model_{len(_MODEL_FILES)}_{path.stem}")
    module_spec = importlib.util.spec_from_file_location(name, path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    folder = str(resolved.parent)
    for loaded in _SIBLINGS:  # as a fresh ``python path`` would, its siblings imported anew
        sys.modules.pop(loaded, None)
    _SIBLINGS.clear()
    sys.modules[name] = module
    try:
        with _in_its_folder(folder):
            module_spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module, folder


def _import_factory(spec: str) -> Callable[[], object]:
    check_model_name(spec)
    module_name, _, attr = spec.rpartition(":")
    folder = None
    try:
        if module_name.endswith(".py"):
            module, folder = _import_file(Path(module_name))
        else:
            if "" not in sys.path and os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except Exception as err:
        raise CliError(f"--model {spec}: cannot import {module_name}: {err}") from err
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CliError(f"--model {spec}: {module_name} has no callable '{attr}'")
    if folder is None:
        return factory

    def from_its_folder() -> object:
        """The factory, its file's folder on ``sys.path`` as at its import (an import in its
        body finds the modules beside it)."""
        with _in_its_folder(folder):
            return factory()

    return from_its_folder


def build_model(
    name: str,
    *,
    input_shape: tuple[int, ...],
    num_classes: int = NUM_CLASSES,
    activation: str = "relu",
    width: int | None = None,
    depth: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    weights: Path | None = None,
) -> nn.Module:
    """A preset (``mlp``, ``cnn``, ``resnet``) or ``package.module:factory`` (called with no
    arguments, its lazy layers initialised by a forward of inputs of ``input_shape``),
    initialised under ``seed`` without touching the global RNG, in eval mode."""
    if activation not in ACTIVATIONS:
        raise CliError(f"unknown activation '{activation}'; choose from {', '.join(ACTIVATIONS)}")
    factory = None if name in PRESETS else _import_factory(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if factory is None:
            w = DEFAULT_WIDTH[name] if width is None else width
            d = DEFAULT_DEPTH[name] if depth is None else depth
            if w < 1 or d < 0 or (name != "mlp" and d < 1):
                raise CliError(f"--width {w} / --depth {d} do not make a {name}")
            try:
                model = _preset(name, input_shape, num_classes, ACTIVATIONS[activation], w, d)
            except (torch.OutOfMemoryError, RuntimeError) as err:
                if not _out_of_memory(err):
                    raise
                # (--width 100000 had ended in the allocator's traceback; probe 146)
                raise CliError(f"--model {name} at --width {w} --depth {d} does not fit in "
                               "memory (its parameters could not be allocated): choose a "
                               "smaller --width or --depth") from err
        else:
            try:
                built = factory()
            except Exception as err:
                # (a factory of one argument had been told its TypeError alone; probe 187)
                hint = ("; a --model factory is called with no arguments: bind them first "
                        "(functools.partial, or a function of none)"
                        if isinstance(err, TypeError) else "")
                raise CliError(f"--model {name}: the factory raised {err!r}{hint}") from err
            if not isinstance(built, nn.Module):
                raise CliError(f"--model {name} returned {type(built).__name__}, not an nn.Module")
            model = built
            if any(is_lazy(parameter) for parameter in model.parameters()):
                # Lazy layers draw their values at the first forward: here, under the seed (at
                # check_model's, from the global generator, each run measured another model and
                # --seed changed nothing; probe 177), in eval mode, as the model is measured (in
                # training mode it had moved a BatchNorm's running statistics; probe 181).
                try:
                    with torch.no_grad():
                        model.eval()(torch.zeros(2, *input_shape))
                except Exception as err:
                    raise _fails_on_inputs(name, input_shape, err) from err
    if weights is not None:
        try:
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        except Exception as err:
            if isinstance(err, OSError):  # missing, a folder, unreadable: the hint is not ours
                raise CliError(f"--weights {weights}: {err.strerror or err}") from err
            if not _saved_by_torch(weights):  # (its text had been read as a pickled model)
                raise CliError(f"--weights {weights} is not a file torch.save wrote (neither its "
                               "zip format nor a pickle): save the state_dict with "
                               "torch.save(model.state_dict(), path)") from err
            if "weights_only" in str(err):  # torch's advice (weights_only=False) is not ours
                raise CliError(
                    f"--weights {weights} holds more than tensors (a pickled model, or a "
                    "checkpoint with other objects), which hessrank does not unpickle: save the "
                    "state_dict alone, torch.save(model.state_dict(), path)") from err
            raise CliError(f"--weights {weights}: {err} (the file must hold a state_dict of the "
                           "--model given: the same parameter names and shapes)") from err
    return model.to(device=device, dtype=dtype).eval()


def check_weights(path: Path | None) -> None:
    """``--weights path`` can be opened (what :func:`build_model` reads of it is checked there).

    Raises:
        CliError: missing, a folder, unreadable.
    """
    if path is None:
        return
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise CliError(f"--weights {path}: {err.strerror or err}") from err


def _saved_by_torch(path: str | Path) -> bool:
    """Whether ``path`` looks like a ``torch.save`` file: its zip format, or a legacy pickle."""
    try:
        with open(path, "rb") as handle:
            return zipfile.is_zipfile(handle) or handle.seek(0) == 0 and handle.read(1) == b"\x80"
    except OSError:
        return True  # unreadable: torch's own error says why


def _fails_on_inputs(name: str, shape: tuple[int, ...], error: Exception) -> CliError:
    """The error for a model that raised ``error`` on inputs of ``shape`` (a sample's), with
    what sets that shape (a model for 28 x 28 inputs had been told torch's shape error alone;
    probe 187)."""
    shown = ", ".join(str(size) for size in ("N", *shape))
    return CliError(f"model {name} fails on the data's inputs, of shape ({shown}): {error}; "
                    "choose the data the model takes (--data, and --image-size for MNIST's "
                    "side), or a model for these inputs")


def check_model(model: nn.Module, data: Dataset, name: str) -> None:
    """Fail with one line unless ``model`` maps the inputs to (N, num_classes) logits."""
    try:
        with torch.no_grad():
            out = model(data.inputs[:2])
    except Exception as err:
        raise _fails_on_inputs(name, tuple(data.inputs.shape[1:]), err) from err
    if not isinstance(out, Tensor) or tuple(out.shape) != (2, data.num_classes):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        expected = f"(N, {data.num_classes})"
        raise CliError(f"model {name} returns {got}, expected logits of shape {expected}")


def num_params(model: nn.Module) -> int:
    """Trainable parameter count."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
