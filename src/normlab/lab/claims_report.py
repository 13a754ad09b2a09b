"""Report sections of the noise, ghost and in-depth experiments: tables and figures.

Records of the ghost ("gbn<k>") and in-depth ("in-first-<k>") runs are the experiments'
own; `main_records` leaves them out of the batch-size, shift and curves sections.
Numbers over seeds are mean ± sample standard deviation, as in `normlab.lab.report`.

Example:
    >>> lines = noise_table(records)  # doctest: +SKIP
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from pathlib import Path

from normlab.lab.figures import _pyplot, _seeds_note, _stats
from normlab.lab.models import GHOST_NORM, IN_FIRST
from normlab.lab.shifts import SHIFT_LABELS, SHIFTS

_STEP_COPY = re.compile(r"\.\d+$")  # an RNN's per-step copies: norm_h.0 ... norm_h.15


def is_experiment_norm(norm: str) -> bool:
    """True for the ghost and in-depth experiments' own norms ("gbn8", "in-first-3")."""
    return bool(GHOST_NORM.fullmatch(norm) or IN_FIRST.fullmatch(norm))


def main_records(records: list[dict]) -> list[dict]:
    """The records of the norms asked for (all of them if the experiments' are the only ones)."""
    main = [r for r in records if not is_experiment_norm(r["norm"])]
    return main or records


def _fmt(value: float) -> str:
    if value != value:  # NaN
        return "nan"
    return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"


def _cell(values: list[float]) -> str:
    if any(v != v for v in values):
        return "nan"  # a run that diverged
    mean, std = _stats(values)
    return _fmt(mean) if len(values) < 2 else f"{_fmt(mean)} ± {_fmt(std)}"


def _norms(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["norm"] for r in records))


def noise_table(records: list[dict]) -> list[str]:
    """Markdown: `batch_noise` per norm (rows) and batch size (columns)."""
    measured = [r for r in records if "batch_noise" in r]
    sizes = sorted({r["batch_size"] for r in measured})
    groups: dict[tuple[str, int], list[float]] = defaultdict(list)
    for r in measured:
        groups[(r["norm"], r["batch_size"])].append(r["batch_noise"])
    lines = [
        "| norm | " + " | ".join(f"batch {b}" for b in sizes) + " |",
        "|---|" + "---:|" * len(sizes),
    ]
    for norm in _norms(measured):
        cells = [_cell(groups[(norm, b)]) if (norm, b) in groups else "–" for b in sizes]
        lines.append(f"| {norm} | " + " | ".join(cells) + " |")
    return lines


def layer_groups(layers: dict[str, float], steps: bool) -> dict[str, float]:
    """Per-layer noise; with `steps` (the RNN), its per-step copies (``norm_h.3``) are
    averaged into one row (``norm_h``)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for name, value in layers.items():
        groups[_STEP_COPY.sub("", name) if steps else name].append(value)
    # a copy whose output is the same for every probe (step 0 of h: h_0 = 0) has no ratio
    return {
        name: statistics.fmean([v for v in values if v == v] or [float("nan")])
        for name, values in groups.items()
    }


def noise_layers_table(records: list[dict], norm: str) -> list[str]:
    """Markdown: batch noise of each norm layer of `norm`'s runs (rows, registration
    order; an RNN's per-step copies as one row) per batch size (columns), mean over seeds."""
    mine = [r for r in records if r["norm"] == norm and r.get("batch_noise_layers")]
    sizes = sorted({r["batch_size"] for r in mine})
    values: dict[tuple[str, int], list[float]] = defaultdict(list)
    names: list[str] = []
    for r in mine:
        steps = r.get("model") == "rnn"
        for name, value in layer_groups(r["batch_noise_layers"], steps).items():
            values[(name, r["batch_size"])].append(value)
            if name not in names:
                names.append(name)
    lines = [
        "| layer | " + " | ".join(f"batch {b}" for b in sizes) + " |",
        "|---|" + "---:|" * len(sizes),
    ]
    for name in names:
        cells = [
            _fmt(statistics.fmean(values[(name, b)])) if values[(name, b)] else "–" for b in sizes
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


FLOOR = 1e-9  # zero noise is drawn at this height on the log axis


def noise_figure(records: list[dict], path: Path) -> Path:
    """`batch_noise` vs batch size (log-log), one line per norm; zeros sit on the floor."""
    plt = _pyplot()
    measured = [r for r in records if "batch_noise" in r]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), constrained_layout=True)
    sizes = sorted({r["batch_size"] for r in measured})
    for norm in _norms(measured):
        xs, ys, es = [], [], []
        for b in sizes:
            values = [
                r["batch_noise"] for r in measured if r["norm"] == norm and r["batch_size"] == b
            ]
            values = [v for v in values if v == v]  # diverged runs (NaN) are left out
            if values:
                mean, std = _stats(values)
                xs.append(b)
                ys.append(max(mean, FLOOR))
                es.append(std)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=norm)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_xlabel("batch size the model trained at and is measured at")
    ax.set_ylabel("batch noise (std over companions / std over probes)")
    ax.set_title(f"Batch noise of the logits ({_seeds_note(measured)}; {FLOOR:g} = zero)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="norm")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _ghost_runs(records: list[dict]) -> dict[int, list[dict]]:
    runs: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        match = GHOST_NORM.fullmatch(r["norm"])
        if match:
            runs[int(match[1])].append(r)
    return dict(sorted(runs.items()))


def ghost_table(records: list[dict]) -> list[str]:
    """Markdown: per ghost batch size, test error (%), `batch_noise` and final train loss."""
    lines = [
        "| ghost batch | test error (%) | batch noise | final train loss |",
        "|---:|---:|---:|---:|",
    ]
    for size, runs in _ghost_runs(records).items():
        error = [100 * r["error"] for r in runs]
        mean, std = _stats(error)
        err = f"{mean:.1f}" + (f" ± {std:.1f}" if len(runs) > 1 else "")
        noise = _cell([r["batch_noise"] for r in runs if "batch_noise" in r])
        loss = _cell([r["train_loss"][-1] for r in runs])
        lines.append(f"| {size} | {err} | {noise} | {loss} |")
    return lines


def ghost_figure(records: list[dict], path: Path) -> Path:
    """Test error and batch noise vs ghost batch size, at the runs' (fixed) batch size."""
    plt = _pyplot()
    runs = _ghost_runs(records)
    sizes = list(runs)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 4.0), constrained_layout=True)
    for ax, key, scale in ((left, "error", 100.0), (right, "batch_noise", 1.0)):
        stats = [_stats([scale * r[key] for r in runs[g]]) for g in sizes]
        ax.errorbar(sizes, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(g) for g in sizes])
        ax.set_xlabel("ghost batch size (samples per set of statistics)")
        ax.grid(True, which="both", alpha=0.3)
    left.set_ylabel("test error (%)")
    right.set_ylabel("batch noise")
    right.set_yscale("log")
    batch = next(iter(runs.values()))[0]["batch_size"]
    fig.suptitle(f"Ghost batch norm at batch {batch} ({_seeds_note(records)})")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _in_depth_runs(records: list[dict]) -> dict[int, list[dict]]:
    runs: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        match = IN_FIRST.fullmatch(r["norm"])
        if match:
            runs[int(match[1])].append(r)
    return dict(sorted(runs.items()))


def in_depth_table(records: list[dict]) -> list[str]:
    """Markdown: accuracy (%) clean and under each shift per k (IN in the first k norm layers)."""
    columns = ["clean", *SHIFTS]
    lines = [
        "| IN in first k | " + " | ".join(SHIFT_LABELS.get(c, c) for c in columns) + " |",
        "|---:|" + "---:|" * len(columns),
    ]
    for k, runs in _in_depth_runs(records).items():
        cells = []
        for c in columns:
            values = [100 * (r["accuracy"] if c == "clean" else r["shifted"][c]) for r in runs]
            mean, std = _stats(values)
            cells.append(f"{mean:.1f}" + (f" ± {std:.1f}" if len(values) > 1 else ""))
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return lines


def in_depth_figure(records: list[dict], path: Path) -> Path:
    """Accuracy clean and under each shift vs k, the number of leading IN layers."""
    plt = _pyplot()
    runs = _in_depth_runs(records)
    ks = list(runs)
    fig, ax = plt.subplots(figsize=(7.6, 4.4), constrained_layout=True)
    for c in ["clean", *SHIFTS]:
        stats = [
            _stats([100 * (r["accuracy"] if c == "clean" else r["shifted"][c]) for r in runs[k]])
            for k in ks
        ]
        ax.errorbar(
            ks,
            [m for m, _ in stats],
            yerr=[s for _, s in stats],
            marker="o",
            capsize=2,
            lw=2.5 if c == "clean" else 1.2,
            label=SHIFT_LABELS.get(c, c),
        )
    ax.set_xticks(ks)
    ax.set_ylim(0, 100)
    ax.set_xlabel("k: instance norm in the first k norm layers (forward order), batch norm after")
    ax.set_ylabel("test accuracy (%)")
    first = next(iter(runs.values()))[0]
    ax.set_title(
        f"IN where? {first['model']}, batch {first['batch_size']} ({_seeds_note(records)})"
    )
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sections(
    records: list[dict], out: Path, experiments: list[str], paths: dict[str, Path]
) -> list[str]:
    """summary.md's sections for the noise, ghost and in-depth experiments; their figures
    are written to `out` and added to `paths`."""
    text: list[str] = []
    main = main_records(records)
    if "noise" in experiments and any("batch_noise" in r for r in main):
        paths["noise_png"] = noise_figure(main, out / "noise.png")
        text += [
            "## Batch noise vs batch size",
            "",
            "Each probe test image in random batches of training images, in training mode: "
            "std of its logits over the batches / std of the logits over probes "
            "(0: the output does not depend on the other samples).",
            "",
            *noise_table(main),
            "",
            "![batch noise vs batch size](noise.png)",
            "",
        ]
        for norm in _norms(main):
            mine = [r for r in main if r["norm"] == norm and r.get("batch_noise_layers")]
            if any(v > 1e-5 for r in mine for v in r["batch_noise_layers"].values()):
                text += [f"Per norm layer ({norm}):", "", *noise_layers_table(main, norm), ""]
    if "ghost" in experiments and _ghost_runs(records):
        paths["ghost_png"] = ghost_figure(records, out / "ghost.png")
        text += [
            "## Ghost batch norm: the noise alone",
            "",
            "Same batch size, learning rate and steps; only the number of samples each "
            "set of batch statistics is computed over changes.",
            "",
            *ghost_table(records),
            "",
            "![ghost batch norm](ghost.png)",
            "",
        ]
    if "in-depth" in experiments and _in_depth_runs(records):
        paths["in_depth_png"] = in_depth_figure(records, out / "in-depth.png")
        text += [
            "## Instance norm in the first k layers, batch norm after",
            "",
            "Test accuracy (%), clean and under appearance shifts (test images only).",
            "",
            *in_depth_table(records),
            "",
            "![IN depth](in-depth.png)",
            "",
        ]
    return text
