"""One error path for the user's input: one line on stderr, exit status 2, no traceback
(bad shapes, unwritable outputs, truncated archives and images, folders with more images
than the open-file limit), and the HTML report a sweep leaves."""

from __future__ import annotations

import base64
import io
import os
import re
import resource

import numpy as np
import pytest
import torch
from PIL import Image

from normlab.cli import main
from normlab.lab.data import load_image_folder, load_npz


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"normlab {command}: error: "), err
    return lines[0]


@pytest.mark.parametrize("shape", ["8,,32,32", "8,64,", ",8"])
def test_explain_refuses_an_empty_shape_field(capsys, shape):
    assert main(["explain", "n c h w -> c", "--shape", shape]) == 2
    assert "positive integers" in _one_line_error(capsys, "explain")


def test_draw_to_an_unwritable_file(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    argv = ["draw", "n c h w -> c", "--shape", "2,3,4,4", "-o", str(blocker / "x.png")]
    assert main(argv) == 2
    _one_line_error(capsys, "draw")


def _npz_bytes() -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    np.savez_compressed(
        buffer, x=rng.integers(0, 255, (40, 8, 8), dtype=np.uint8), y=np.arange(40) % 2
    )
    return buffer.getvalue()


@pytest.mark.parametrize("keep", [0.3, 0.9])
def test_a_truncated_npz(tmp_path, capsys, keep):
    raw = _npz_bytes()
    path = tmp_path / "cut.npz"
    path.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(ValueError, match="npz: cannot read"):
        load_npz(path)
    assert main(["compare", "--data", str(path), "--out", str(tmp_path / "out")]) == 2
    _one_line_error(capsys, "compare")
    assert not (tmp_path / "out").exists()


def _png(value: int, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    colour = value if mode == "L" else (value, 255 - value, 0)
    Image.new(mode, (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_truncated_image_in_a_folder(tmp_path, capsys):
    for label in ("a", "b"):
        (tmp_path / "set" / label).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "set" / label / f"{i}.png").write_bytes(_png(40 * i))
    (tmp_path / "set" / "b" / "1.png").write_bytes(_png(10)[:30])
    with pytest.raises(ValueError, match="1.png"):
        load_image_folder(tmp_path / "set")
    assert main(["compare", "--data", str(tmp_path / "set"), "--out", str(tmp_path / "o")]) == 2
    assert "1.png" in _one_line_error(capsys, "compare")


def test_a_folder_with_more_images_than_the_open_file_limit(tmp_path):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(60):
            (tmp_path / label / f"{i:03d}.png").write_bytes(_png(i * 4))
    (tmp_path / "b" / "059.png").write_bytes(_png(9, mode="RGB"))  # one colour image
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 40, hard))  # fewer than 120 images
    try:
        data = load_image_folder(tmp_path, seed=0)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(data.x_train) + len(data.x_test) == 120
    assert data.image_shape == (3, 8, 8)  # one colour image makes the set RGB
    # a grey image becomes three equal channels holding its value
    grey = torch.cat([data.x_train, data.x_test])
    value = 4 * 7 / 255
    hits = (grey - value).abs().amax(dim=(1, 2, 3)) < 1e-6
    assert hits.sum() >= 1


def test_the_html_report_is_self_contained_and_labelled(tmp_path):
    argv = ["compare", "--norms", "bn", "gn", "--batch-sizes", "8", "--epochs", "1"]
    argv += ["--seeds", "1", "--limit", "40", "--jobs", "1", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    images = re.findall(r'src="([^"]*)"', page)
    assert len(images) == 3 and all(i.startswith("data:image/png;base64,") for i in images)
    png = base64.b64decode(images[0].split(",", 1)[1])
    assert png == (tmp_path / "batch-size.png").read_bytes()  # the figure itself, embedded
    assert "http" not in page.replace("<!DOCTYPE html>", "")  # nothing fetched from elsewhere
    assert page.count("<table>") == 3 and "<td>gn</td>" in page
    summary = (tmp_path / "summary.md").read_text()
    assert "digits, cnn, 1 epochs" in summary and "digits, cnn, 1 epochs" in page
