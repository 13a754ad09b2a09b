"""The sweep's figures (matplotlib, Agg backend): error vs batch size, accuracy under
shifts, training curves. Error bars and bands are ± one standard deviation over seeds;
`label` (the model and data) is printed under each title.

Example:
    >>> batch_size_figure(records, Path("out/batch-size.png"))  # doctest: +SKIP
"""

from __future__ import annotations

import statistics
from pathlib import Path

from normlab.lab.shifts import SHIFT_LABELS, SHIFTS


def _pyplot():  # noqa: ANN202 - matplotlib's module
    try:
        import matplotlib
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError("figures need matplotlib: pip install 'normlab[lab]'") from error
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _norms(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["norm"] for r in records))


def _seeds_note(records: list[dict]) -> str:
    seeds = len({r["seed"] for r in records})
    return f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed"


def _titled(title: str, label: str) -> str:
    return f"{title}\n{label}" if label else title


def batch_size_figure(records: list[dict], path: Path, label: str = "") -> Path:
    """Test error (%) vs batch size (log2 axis), one line per norm."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), constrained_layout=True)
    sizes = sorted({r["batch_size"] for r in records})
    means: list[float] = []
    for norm in _norms(records):
        xs, ys, es = [], [], []
        for b in sizes:
            values = [
                100 * r["error"] for r in records if r["norm"] == norm and r["batch_size"] == b
            ]
            if values:
                mean, std = _stats(values)
                xs.append(b)
                ys.append(mean)
                es.append(std)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=norm)
        means += ys
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    if means and min(means) > 0 and max(means) / min(means) > 20:
        ax.set_yscale("log")  # a failing norm would otherwise flatten every other line
    ax.set_xlabel("batch size (images per step, log scale)")
    ax.set_ylabel("test error (%)")
    ax.set_title(_titled(f"Test error vs batch size ({_seeds_note(records)})", label))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="norm")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def shift_figure(records: list[dict], path: Path, label: str = "") -> Path:
    """Grouped bars: test accuracy (%) clean and under each shift, one bar per norm."""
    plt = _pyplot()
    norms = _norms(records)
    columns = ["clean", *SHIFTS]
    fig, ax = plt.subplots(figsize=(9.0, 4.4), constrained_layout=True)
    width = 0.8 / len(norms)
    for i, norm in enumerate(norms):
        mine = [r for r in records if r["norm"] == norm]
        stats = [
            _stats([100 * (r["accuracy"] if c == "clean" else r["shifted"][c]) for r in mine])
            for c in columns
        ]
        xs = [j + (i - (len(norms) - 1) / 2) * width for j in range(len(columns))]
        ax.bar(xs, [m for m, _ in stats], width, yerr=[s for _, s in stats], capsize=2, label=norm)
    ax.set_xticks(
        range(len(columns)), [SHIFT_LABELS.get(c, c).replace(" ", "\n", 1) for c in columns]
    )
    ax.set_ylim(0, 100)
    classes = records[0]["num_classes"]
    ax.axhline(100 / classes, color="grey", lw=0.8, ls=":", label=f"chance ({classes} classes)")
    ax.set_xlabel("test-time appearance shift (never seen in training)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(
        _titled(
            f"Accuracy under appearance shifts, batch {records[0]['batch_size']} "
            f"({_seeds_note(records)})",
            label,
        )
    )
    ax.legend(title="norm", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def curves_figure(records: list[dict], path: Path, label: str = "") -> Path:
    """Training loss and test accuracy per epoch, mean over seeds with a ± std band."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 4.0), constrained_layout=True)
    for norm in _norms(records):
        mine = [r for r in records if r["norm"] == norm]
        for ax, key, scale in ((left, "train_loss", 1.0), (right, "test_accuracy", 100.0)):
            per_epoch = list(zip(*(r[key] for r in mine), strict=True))
            stats = [_stats([scale * v for v in epoch]) for epoch in per_epoch]
            epochs = range(1, len(stats) + 1)
            means = [m for m, _ in stats]
            (line,) = ax.plot(epochs, means, marker="o", label=norm)
            ax.fill_between(
                epochs,
                [m - s for m, s in stats],
                [m + s for m, s in stats],
                color=line.get_color(),
                alpha=0.15,
            )
    left.set_yscale("log")
    left.set_xlabel("epoch")
    left.set_ylabel("training loss (cross-entropy, log scale)")
    left.set_title("Training loss")
    right.set_xlabel("epoch")
    right.set_ylabel("test accuracy (%)")
    right.set_title("Test accuracy")
    for ax in (left, right):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(True, alpha=0.3)
        ax.legend(title="norm")
    fig.suptitle(
        _titled(
            f"Training curves, batch {records[0]['batch_size']} ({_seeds_note(records)})", label
        )
    )
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
