"""Where a run's model and data come from: the built-in ones, or the user's own.

A model is a built-in name (``cnn``, ``resnet``, ``rnn``), ``MODULE:FUNCTION`` (imported
with the current directory on the path), or, from Python, a callable. A user function
that takes ``norm_layer`` (the torchvision/timm convention) gets a factory for the norm
under test; otherwise, and for norms that change the model as a whole (``ibn-a``,
``ibn-b``, ``syncbn``), the model is built once and its normalization layers are
swapped with :func:`normlab.convert`. ``num_classes``, ``in_channels`` and ``in_chans``
are passed when the function takes them.

Data is a built-in spec (see :func:`normlab.lab.load_data`), ``MODULE:FUNCTION`` or a
callable returning ``(train, test)`` map-style Datasets of ``(image tensor [C, H, W],
label)``; it is read through DataLoaders, never held in memory as a whole.

Example:
    >>> source = DataSpec("digits", limit=100)
    >>> data = source.load()
    >>> data.image_shape, data.num_classes
    ((1, 16, 16), 10)
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

import normlab
from normlab.lab.data import load_data
from normlab.lab.models import CONVERTED_NORMS, MODELS, build_model

# Norms that change the model as a whole: always made by normlab.convert.
WHOLE_MODEL_NORMS = (*CONVERTED_NORMS, "syncbn")
# Keywords a norm_layer factory passes on to the registry when the norm accepts them.
FACTORY_OPTIONS = ("eps", "momentum", "affine")


class SourceError(ValueError):
    """A --model or --data the laboratory cannot use (the user's input: exit status 2)."""


# --------------------------------------------------------------------------- MODULE:FUNCTION


def is_reference(spec: object) -> bool:
    """True for a ``MODULE:FUNCTION`` string (as opposed to a built-in name or a path)."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        return False
    module, function = spec.split(":")
    parts = module.split(".")
    return bool(function.isidentifier() and parts and all(p.isidentifier() for p in parts))


def resolve(spec: str, what: str) -> Callable:
    """Import ``MODULE:FUNCTION`` (the current directory importable) and return the callable."""
    module_name, function_name = spec.split(":")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - any failure to import is the user's module
        raise SourceError(
            f"{what}: cannot import {module_name!r} for {spec!r} ({type(error).__name__}: {error})"
        ) from error
    function = getattr(module, function_name, None)
    if function is None:
        raise SourceError(f"{what}: module {module_name!r} has no {function_name!r} ({spec!r})")
    if not callable(function):
        raise SourceError(
            f"{what}: expected {spec!r} to be callable, got {type(function).__name__}"
        )
    return function


def fingerprint(*functions: Callable | None) -> str:
    """A short hash of the functions' source (their module's file when the source is not
    available), so that an edited function does not reuse old runs. '' for no function."""
    parts = []
    for function in functions:
        if function is None:
            continue
        try:
            text = inspect.getsource(function)
        except (OSError, TypeError):
            module = sys.modules.get(getattr(function, "__module__", "") or "")
            path = getattr(module, "__file__", None)
            text = Path(path).read_text() if path else repr(function)
        parts.append(f"{getattr(function, '__qualname__', '')}\n{text}")
    if not parts:
        return ""
    return hashlib.sha1("\0".join(parts).encode()).hexdigest()[:12]


def module_paths(*specs: str) -> list[str]:
    """The files or package folders of the modules named by ``MODULE:FUNCTION`` specs
    (what a remote worker needs to import them)."""
    paths = []
    for spec in specs:
        if not is_reference(spec):
            continue
        top = spec.split(":")[0].split(".")[0]
        module = sys.modules.get(top) or importlib.import_module(top)
        path = getattr(module, "__file__", None)
        if path is None:
            continue
        path = Path(path)
        paths.append(str(path.parent if path.name == "__init__.py" else path))
    return list(dict.fromkeys(paths))


# --------------------------------------------------------------------------- data


@dataclass
class LoadedData:
    """A train and a test Dataset of (image [C, H, W], label), with what a model needs."""

    name: str
    train: Dataset
    test: Dataset
    image_shape: tuple[int, int, int]
    num_classes: int


def _labels(dataset: Dataset) -> list[int] | None:
    for attribute in ("targets", "labels"):
        values = getattr(dataset, attribute, None)
        if values is not None:
            return [int(v) for v in values]
    return None


@dataclass(frozen=True)
class DataSpec:
    """Where the images come from: a built-in spec or ``MODULE:FUNCTION`` (`function`
    holds a callable given from Python). `limit` keeps at most that many train and test
    images (a seeded subset); the split of built-in sets is always seeded with 0."""

    spec: str = "digits"
    limit: int | None = None
    cache_dir: str | None = None
    num_classes: int | None = None
    function: Callable | None = field(default=None, compare=False, hash=False, repr=False)

    def user_function(self) -> Callable | None:
        """The user's data function, or None for the built-in sources."""
        if self.function is not None:
            return self.function
        return resolve(self.spec, "data") if is_reference(self.spec) else None

    def load(self) -> LoadedData:
        """The Datasets (built-in ones are in memory as a TensorDataset; the user's are not)."""
        function = self.user_function()
        if function is None:
            images = load_data(self.spec, seed=0, cache_dir=self.cache_dir, limit=self.limit)
            return LoadedData(
                images.name,
                TensorDataset(images.x_train, images.y_train),
                TensorDataset(images.x_test, images.y_test),
                images.image_shape,
                images.num_classes,
            )
        return _user_data(function, self.spec, self.limit, self.num_classes)


def _user_data(
    function: Callable, name: str, limit: int | None, num_classes: int | None
) -> LoadedData:
    try:
        result = function()
    except Exception as error:  # noqa: BLE001 - the user's function failed
        raise SourceError(f"data: {name} raised {type(error).__name__}: {error}") from error
    if not (isinstance(result, tuple | list) and len(result) == 2):
        raise SourceError(
            f"data: expected {name} to return (train, test) Datasets, got {type(result).__name__}"
        )
    parts = []
    for part, dataset in zip(("train", "test"), result, strict=True):
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise SourceError(
                f"data: expected {name}'s {part} part to be a map-style Dataset "
                f"(__getitem__ and __len__), got {type(dataset).__name__}"
            )
        if len(dataset) == 0:
            raise SourceError(f"data: {name}'s {part} part is empty")
        parts.append(dataset)
    train, test = parts
    shape = None
    for part, dataset in (("train", train), ("test", test)):
        item = dataset[0]
        if not (isinstance(item, tuple | list) and len(item) == 2):
            raise SourceError(
                f"data: expected {name}'s {part} items to be (image tensor, label), "
                f"got {type(item).__name__}"
            )
        image, label = item
        if not (isinstance(image, torch.Tensor) and image.ndim == 3 and image.is_floating_point()):
            raise SourceError(
                f"data: expected {name}'s {part} images to be float tensors [C, H, W], got "
                f"{type(image).__name__} {tuple(getattr(image, 'shape', ()))}"
            )
        if isinstance(label, torch.Tensor):
            label = label.item() if label.numel() == 1 else label
        if isinstance(label, bool) or not isinstance(label, int):
            raise SourceError(f"data: expected {name}'s {part} labels to be ints, got {label!r}")
        if shape is not None and tuple(image.shape) != shape:
            raise SourceError(
                f"data: expected train and test images of one shape, got {shape} and "
                f"{tuple(image.shape)}"
            )
        shape = tuple(image.shape)
    if limit:
        train, test = _subset(train, limit), _subset(test, limit)
    classes = num_classes
    if classes is None:
        names = getattr(result[0], "classes", None)
        labels = _labels(train)
        if names is not None:
            classes = len(names)
        else:
            if labels is None:  # read the labels once (images are read and dropped)
                labels = [int(train[i][1]) for i in range(len(train))]
            classes = max(labels) + 1
    return LoadedData(name, train, test, shape, classes)  # type: ignore[arg-type]


def _subset(dataset: Dataset, limit: int) -> Dataset:
    if len(dataset) <= limit:
        return dataset
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:limit]
    return Subset(dataset, sorted(keep.tolist()))


# --------------------------------------------------------------------------- models


class NormFactory:
    """What a model's ``norm_layer`` argument receives: called as ``(channels, **keywords)``
    like ``nn.BatchNorm2d``; `eps`, `momentum`, `affine` go to the norm when it accepts
    them, other keywords are ignored, each with a note."""

    def __init__(self, norm: str, notes: list[str]) -> None:
        self.norm = norm
        self.notes = notes
        self.calls = 0

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def __call__(self, num_features: int, *args: object, **keywords: object) -> nn.Module:
        self.calls += 1
        if args:
            self._note(f"norm_layer: ignored positional arguments {args!r}")
        options = {}
        for key, value in keywords.items():
            if key in FACTORY_OPTIONS:
                try:
                    normlab.create_norm(self.norm, num_features, **{key: value})
                except (TypeError, ValueError):
                    self._note(f"norm_layer: {self.norm} takes no {key}={value!r}; ignored")
                    continue
                options[key] = value
            else:
                self._note(f"norm_layer: ignored {key}={value!r}")
        return normlab.create_norm(self.norm, num_features, **options)


def _is_norm(module: nn.Module) -> bool:
    from normlab.convert import is_norm

    return is_norm(module)


def norm_modules(model: nn.Module) -> dict[str, int]:
    """Class name -> count of the normalization layers in `model` (a layer built from other
    norms, such as IBN, counts once, not its parts)."""
    found: Counter[str] = Counter()

    def visit(module: nn.Module) -> None:
        if _is_norm(module):
            found[type(module).__name__] += 1
            return
        for child in module.children():
            visit(child)

    visit(model)
    return dict(sorted(found.items()))


def _call_model(function: Callable, name: str, keywords: dict) -> nn.Module:
    try:
        model = function(**keywords)
    except Exception as error:  # noqa: BLE001 - the user's function failed
        raise SourceError(f"model: {name} raised {type(error).__name__}: {error}") from error
    if not isinstance(model, nn.Module):
        raise SourceError(
            f"model: expected {name} to return an nn.Module, got {type(model).__name__}"
        )
    return model


def build_user_model(
    function: Callable,
    name: str,
    norm: str,
    *,
    image_shape: tuple[int, int, int],
    num_classes: int,
) -> tuple[nn.Module, list[str]]:
    """Build the user's model with every normalization layer of kind `norm`; return it and
    notes (keywords ignored, layers a swap did not reach). Nothing swapped: ValueError."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        parameters = {}
    keywords: dict[str, object] = {}
    if "num_classes" in parameters:
        keywords["num_classes"] = num_classes
    for key in ("in_channels", "in_chans"):
        if key in parameters:
            keywords[key] = image_shape[0]
    notes: list[str] = []
    if "norm_layer" in parameters and norm not in WHOLE_MODEL_NORMS:
        factory = NormFactory(norm, notes)
        model = _call_model(function, name, {**keywords, "norm_layer": factory})
        if factory.calls:
            _note_partial(model, norm, notes)
            return model, notes
        notes.append("norm_layer was never called; swapped with normlab.convert instead")
    model = _call_model(function, name, keywords)
    try:
        model, report = normlab.convert(model, to=norm)
    except ValueError as error:
        raise ValueError(f"model: {name} with norm {norm!r}: nothing swapped ({error})") from error
    if norm not in CONVERTED_NORMS:
        _note_partial(model, norm, notes)
    notes.append(f"normlab.convert swapped {len(report)} layer(s)")
    return model, notes


def _note_partial(model: nn.Module, norm: str, notes: list[str]) -> None:
    wanted = type(normlab.create_norm(norm, 8)).__name__
    others = {k: v for k, v in norm_modules(model).items() if k != wanted}
    if others and norm != "none":
        kept = ", ".join(f"{v} {k}" for k, v in others.items())
        notes.append(f"partial swap: the model still holds {kept}")


def build_run_model(
    model: str,
    norm: str,
    *,
    image_shape: tuple[int, int, int],
    num_classes: int,
    width: int | None = None,
    depth: int | None = None,
    function: Callable | None = None,
) -> tuple[nn.Module, list[str]]:
    """A run's model: built-in by name, else the user's `function` (or ``MODULE:FUNCTION``)."""
    if function is None and model in MODELS:
        net = build_model(
            model, norm, image_shape=image_shape, num_classes=num_classes, width=width, depth=depth
        )
        return net, []
    if function is None:
        if not is_reference(model):
            raise SourceError(
                f"model: expected one of {', '.join(MODELS)} or MODULE:FUNCTION, got {model!r}"
            )
        function = resolve(model, "model")
    return build_user_model(function, model, norm, image_shape=image_shape, num_classes=num_classes)


def check_model(
    model: str,
    norm: str,
    data: LoadedData,
    *,
    width: int | None = None,
    depth: int | None = None,
    function: Callable | None = None,
) -> None:
    """Build the model once and run two training images through it: SourceError if its
    output is not [2, classes] (or it cannot be built or run on this data)."""
    try:
        net, _ = build_run_model(
            model,
            norm,
            image_shape=data.image_shape,
            num_classes=data.num_classes,
            width=width,
            depth=depth,
            function=function,
        )
    except SourceError:
        raise
    except ValueError as error:
        if function is None and model in MODELS:
            return  # a built-in model a norm cannot fill is a failed run, recorded as such
        raise SourceError(str(error)) from error
    x = torch.stack([data.train[i][0] for i in range(min(2, len(data.train)))])
    net.eval()
    try:
        with torch.no_grad():
            out = net(x)
    except Exception as error:  # noqa: BLE001 - the user's model failed on the data
        raise SourceError(
            f"model: {model} failed on images of shape {tuple(x.shape)} "
            f"({type(error).__name__}: {error})"
        ) from error
    expected = (len(x), data.num_classes)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise SourceError(
            f"model: expected {model} to output logits of shape {expected} "
            f"({data.num_classes} classes), got {got}"
        )
