"""The laboratory on the user's own model and data: `--model MODULE:FUNCTION` (a
`norm_layer` factory, or hard-coded batch norm swapped by convert), `--data
MODULE:FUNCTION` read through DataLoaders, the Python API, and bad modules refused
before any training with one line and exit status 2."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from lab_helpers import run_normlab, untimed
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from normlab.cli import main
from normlab.lab import compare
from normlab.lab.data import load_data
from normlab.lab.sources import NormFactory, norm_modules
from normlab.lab.train import RunConfig, train_run

MODELS = textwrap.dedent(
    """
    from torch import nn

    def with_factory(num_classes, in_channels, norm_layer=nn.BatchNorm2d):
        return nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1, bias=False), norm_layer(8, eps=1e-3),
            nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1, bias=False), norm_layer(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))

    def hard_coded(num_classes=10):
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))

    def partly(num_classes, norm_layer=nn.BatchNorm2d):
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), norm_layer(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))

    def no_norm(num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(256, num_classes))

    def wrong_classes():
        return nn.Sequential(nn.Flatten(), nn.Linear(256, 3), nn.BatchNorm1d(3))

    def not_a_model():
        return "a string"

    NOT_CALLABLE = 3
    """
)

DATA = textwrap.dedent(
    """
    import torch
    from torch.utils.data import Dataset

    class Stripes(Dataset):
        # images made on demand from their index: horizontal (0) or vertical (1) stripes
        classes = ["horizontal", "vertical"]

        def __init__(self, n, offset, scale=1.0):
            self.n, self.offset, self.scale = n, offset, scale

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(self.offset + i)
            label = i % 2
            stripes = (torch.arange(16) % 4 < 2).float()
            image = stripes[:, None].expand(16, 16) if label == 0 else stripes.expand(16, 16)
            image = 0.6 * image + 0.4 * torch.rand(16, 16, generator=g)
            return (self.scale * image)[None], label

    def stripes():
        return Stripes(48, 0), Stripes(32, 10_000)

    def standardized():
        return Stripes(48, 0, scale=-2.0), Stripes(32, 10_000, scale=-2.0)

    def not_datasets():
        return [1, 2, 3]
    """
)

TINY = ["--batch-sizes", "8", "--epochs", "1", "--seeds", "1", "--no-progress", "--jobs", "1"]


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """A folder with the user's modules, as the current directory (not the repository)."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "my_models.py").write_text(MODELS)
    (folder / "my_data.py").write_text(DATA)
    monkeypatch.chdir(folder)
    yield folder
    import sys

    for name in ("my_models", "my_data"):
        sys.modules.pop(name, None)


def _records(out):
    return json.loads((out / "results.json").read_text())


def test_a_model_with_a_norm_layer_factory_from_another_directory(user_dir, tmp_path):
    out = tmp_path / "out"
    argv = ["compare", "--model", "my_models:with_factory", "--norms", "gn", "ln2d"]
    result = run_normlab([*argv, *TINY, "--limit", "40", "--out", str(out)], cwd=user_dir)
    assert result.returncode == 0, result.stderr
    by_norm = {r["norm"]: r for r in _records(out)}
    assert by_norm["gn"]["norm_modules"] == {"GroupNorm": 2}
    assert len(by_norm["ln2d"]["norm_modules"]) == 1
    assert sum(by_norm["ln2d"]["norm_modules"].values()) == 2
    assert "BatchNorm2d" not in by_norm["ln2d"]["norm_modules"]
    assert by_norm["gn"]["model"] == "my_models:with_factory"
    assert (out / "report.html").exists()


def test_a_hard_coded_batch_norm_is_swapped_by_convert(user_dir, tmp_path):
    out = tmp_path / "out"
    argv = ["compare", "--model", "my_models:hard_coded", "--norms", "gn", "bn", "--out", str(out)]
    assert main([*argv, *TINY, "--limit", "40", "--experiment", "batch-size"]) == 0
    by_norm = {r["norm"]: r for r in _records(out)}
    assert by_norm["gn"]["norm_modules"] == {"GroupNorm": 1}
    assert by_norm["bn"]["norm_modules"] == {"BatchNorm": 1}  # normlab's, swapped in


def test_a_partial_swap_is_reported(user_dir, tmp_path):
    out = tmp_path / "out"
    argv = ["compare", "--model", "my_models:partly", "--norms", "gn", "--out", str(out)]
    assert main([*argv, *TINY, "--limit", "40", "--experiment", "batch-size"]) == 0
    (record,) = _records(out)
    assert record["norm_modules"] == {"BatchNorm2d": 1, "GroupNorm": 1}
    assert any("partial swap" in note for note in record["norm_notes"])


def test_the_factory_maps_or_ignores_keywords_with_a_note():
    notes: list[str] = []
    layer = NormFactory("bn", notes)(8, eps=1e-3, momentum=0.2, device=None)
    assert layer.eps == 1e-3 and layer.momentum == 0.2
    assert notes == ["norm_layer: ignored device=None"]
    reference = nn.Sequential(nn.BatchNorm2d(4), nn.Sequential(nn.GroupNorm(2, 4)), nn.ReLU())
    assert norm_modules(reference) == {"BatchNorm2d": 1, "GroupNorm": 1}


def test_a_data_module_is_read_through_data_loaders(user_dir, tmp_path):
    out = tmp_path / "out"
    argv = ["compare", "--data", "my_data:stripes", "--model", "my_models:with_factory"]
    assert main([*argv, "--norms", "gn", *TINY, "--out", str(out), "--data-workers", "2"]) == 0
    (record,) = _records(out)
    assert record["train_images"] == 48 and record["test_images"] == 32
    assert record["num_classes"] == 2 and set(record["shifted"]) >= {"contrast", "invert"}
    # the same images as in-memory tensors give the same numbers (an independent path)
    import my_data

    train, test = my_data.stripes()
    as_tensors = []
    for part in my_data.stripes():
        items = [part[i] for i in range(len(part))]
        images = torch.stack([image for image, _ in items])
        as_tensors.append(TensorDataset(images, torch.tensor([label for _, label in items])))
    records = compare(
        model="my_models:with_factory",
        data=tuple(as_tensors),
        norms=["gn"],
        batch_sizes=[8],
        experiments=["batch-size", "shift", "curves"],
        out=tmp_path / "tensors",
        epochs=1,
        seeds=1,
        jobs=1,
        progress=False,
    )
    keep = ("train_loss", "test_accuracy", "accuracy", "shifted", "norm_modules")
    assert {k: records[0][k] for k in keep} == {k: record[k] for k in keep}


def test_shifts_are_skipped_on_data_outside_zero_one(user_dir, tmp_path):
    out = tmp_path / "out"
    argv = ["compare", "--data", "my_data:standardized", "--model", "my_models:with_factory"]
    assert main([*argv, "--norms", "gn", *TINY, "--out", str(out)]) == 0
    (record,) = _records(out)
    assert record["shifted"] == {} and "[0, 1]" in record["shifts_skipped"]
    assert (
        "Skipped: the appearance shifts assume images in [0, 1]" in (out / "summary.md").read_text()
    )


class Blobs(Dataset):
    """Two classes: a bright or a dark square, made on demand."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        image = torch.full((1, 8, 8), 0.8 if i % 2 else 0.2)
        return image, i % 2


def small_net(num_classes: int, norm_layer=nn.BatchNorm2d) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        norm_layer(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, num_classes),
    )


def test_the_python_api_takes_callables_and_resumes(tmp_path):
    kwargs = dict(
        model=small_net,
        data=lambda: (Blobs(32), Blobs(16)),
        norms=["gn", "bn"],
        batch_sizes=[8],
        experiments=["batch-size"],
        out=tmp_path,
        epochs=1,
        seeds=1,
        jobs=2,
        progress=False,
    )
    records = compare(**kwargs)
    assert [r["norm"] for r in records] == ["gn", "bn"]
    assert records[0]["norm_modules"] == {"GroupNorm": 1}
    assert records[0]["num_classes"] == 2 and records[0]["fingerprint"]
    for name in ("results.json", "results.csv", "summary.md", "report.html", "batch-size.png"):
        assert (tmp_path / name).exists()
    again = compare(**kwargs)
    assert again == records  # read back from the run files, wall times included

    def edited_net(num_classes: int, norm_layer=nn.BatchNorm2d) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, 4, 3),
            norm_layer(4),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, num_classes),
        )

    edited = compare(**{**kwargs, "model": edited_net})
    assert edited[0]["fingerprint"] != records[0]["fingerprint"]
    assert len(list((tmp_path / "runs").glob("*.json"))) == 4  # new runs, old ones kept


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "no_such_module:f"], "cannot import"),
        (["--model", "my_models:missing"], "has no 'missing'"),
        (["--model", "my_models:NOT_CALLABLE"], "to be callable"),
        (["--model", "my_models:not_a_model"], "nn.Module"),
        (["--model", "my_models:wrong_classes"], "(2, 10)"),
        (["--model", "my_models:no_norm", "--norms", "gn"], "nothing swapped"),
        (["--model", "resnet50"], "MODULE:FUNCTION"),
        (["--data", "my_data:not_datasets"], "(train, test)"),
        (["--data", "my_data:nothing"], "has no 'nothing'"),
        (["--norms", "gn", "nope"], "unknown 'nope'"),
        (["--limit", "0"], "limit"),
        (["--width", "0"], "width"),
        (["--jobs", "0"], "jobs"),
        (["--lr", "nan"], "lr"),
        (["--batch-sizes", "0"], "batch size"),
        (["--cpus-per-run", "0"], "cpus_per_run"),
    ],
)
def test_bad_arguments_fail_before_any_training(user_dir, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main(["compare", *argv, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("normlab compare: error:") and message in err[-1]
    assert not out.exists()  # nothing trained, nothing written


def test_an_unwritable_out_fails_before_training(user_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    argv = ["compare", "--norms", "gn", *TINY, "--limit", "40", "--out", str(blocker / "out")]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("normlab compare: error:")


def test_train_run_reads_tensors_and_datasets_alike():
    images = load_data("digits", limit=40)
    config = RunConfig(norm="gn", batch_size=8, epochs=1)
    direct = train_run(config, images)

    class Items(Dataset):
        def __init__(self, x, y):
            self.x, self.y = x, y

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i], int(self.y[i])

    from normlab.lab.sources import LoadedData

    streamed = LoadedData(
        "digits",
        Items(images.x_train, images.y_train),
        Items(images.x_test, images.y_test),
        images.image_shape,
        10,
    )
    assert untimed([train_run(config, streamed, workers=2)]) == untimed([direct])
