"""What a sweep leaves in its folder: results.json, results.csv, summary.md, report.html
(the same content as one self-contained page, figures embedded) and the figures.

Numbers over seeds are given as mean ± standard deviation (sample std, n − 1). A
difference between two norms counts as resolved only when it exceeds the sum of their
standard deviations; smaller ones are marked "≈" (within the seed-to-seed spread).

Example:
    >>> paths = write_outputs(records, "out", experiments=["batch-size"])  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import csv
import html
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

from normlab.lab.shifts import SHIFT_LABELS, SHIFTS
from normlab.lab.sweep import reference_batch

SCALAR_FIELDS = (
    "norm",
    "batch_size",
    "seed",
    "accuracy",
    "error",
    "epochs",
    "model",
    "data",
    "lr",
    "per_process_batch",
    "world_size",
    "steps",
    "train_images",
    "test_images",
    "wall_time",
    "device",
    "batch_noise",
)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value: no spread known)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def within_spread(a: list[float], b: list[float]) -> bool:
    """True when the means of `a` and `b` differ by no more than the sum of their stds."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    if sa is None or sb is None:
        return False
    return abs(ma - mb) <= sa + sb


def _cell(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    mean, std = mean_std(values)
    text = f"{scale * mean:.{digits}f}"
    return text if std is None else f"{text} ± {scale * std:.{digits}f}"


def _group(records: list[dict], key: str = "accuracy") -> dict[tuple[str, int], list[float]]:
    groups: dict[tuple[str, int], list[float]] = defaultdict(list)
    for r in records:
        groups[(r["norm"], r["batch_size"])].append(r[key])
    return groups


def _norms(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["norm"] for r in records))


def batch_size_table(records: list[dict]) -> list[str]:
    """Markdown: test error (%) per norm (rows) and batch size (columns), best in bold."""
    errors = _group(records, "error")
    sizes = sorted({b for _, b in errors})
    norms = _norms(records)
    lines = [
        "| norm | " + " | ".join(f"batch {b}" for b in sizes) + " |",
        "|---|" + "---:|" * len(sizes),
    ]
    for norm in norms:
        cells = []
        for b in sizes:
            values = errors.get((norm, b))
            if not values:
                cells.append("–")
                continue
            column = {n: errors[(n, b)] for n in norms if (n, b) in errors}
            best = min(column, key=lambda n: statistics.fmean(column[n]))
            text = _cell(values)
            if norm == best:
                text = f"**{text}**"
            elif within_spread(values, column[best]):
                text += " ≈"
            cells.append(text)
        lines.append(f"| {norm} | " + " | ".join(cells) + " |")
    return lines


def batch_size_findings(records: list[dict]) -> list[str]:
    """One sentence per norm: error at the smallest vs the largest batch size."""
    errors = _group(records, "error")
    lines = []
    for norm in _norms(records):
        sizes = sorted(b for n, b in errors if n == norm)
        if len(sizes) < 2:
            continue
        small, large = errors[(norm, sizes[0])], errors[(norm, sizes[-1])]
        diff = statistics.fmean(small) - statistics.fmean(large)
        if len(small) < 2 or len(large) < 2:
            verdict = "one seed, so no spread to judge it by"
        elif within_spread(small, large):
            verdict = "within the seed-to-seed spread: no effect shown"
        else:
            verdict = "larger than the seed-to-seed spread"
        lines.append(
            f"- {norm}: {100 * statistics.fmean(small):.1f}% error at batch {sizes[0]} vs "
            f"{100 * statistics.fmean(large):.1f}% at batch {sizes[-1]} "
            f"({100 * diff:+.1f} points; {verdict})."
        )
    return lines


def shift_table(records: list[dict]) -> list[str]:
    """Markdown: accuracy (%) clean and under each shift, one row per norm; ≈ marks
    differences from batch norm's row within the seed spread."""
    norms = _norms(records)
    columns = ["clean", *SHIFTS]
    values = {(r["norm"], c): [] for r in records for c in columns}
    for r in records:
        values[(r["norm"], "clean")].append(r["accuracy"])
        for name in SHIFTS:
            values[(r["norm"], name)].append(r["shifted"][name])
    lines = [
        "| norm | " + " | ".join(SHIFT_LABELS.get(c, c) for c in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for norm in norms:
        cells = []
        for c in columns:
            text = _cell(values[(norm, c)])
            if (
                norm != "bn"
                and ("bn", c) in values
                and within_spread(values[(norm, c)], values[("bn", c)])
            ):
                text += " ≈"
            cells.append(text)
        lines.append(f"| {norm} | " + " | ".join(cells) + " |")
    return lines


def curves_table(records: list[dict]) -> list[str]:
    """Markdown: final training loss and test accuracy per norm."""
    lines = [
        "| norm | epochs | final train loss | final test accuracy (%) |",
        "|---|---:|---:|---:|",
    ]
    for norm in _norms(records):
        mine = [r for r in records if r["norm"] == norm]
        loss = _cell([r["train_loss"][-1] for r in mine], scale=1.0, digits=3)
        lines.append(
            f"| {norm} | {mine[0]['epochs']} | {loss} | {_cell([r['accuracy'] for r in mine])} |"
        )
    return lines


def write_csv(records: list[dict], path: Path) -> None:
    """One row per run: the scalar fields, then one `shift_<name>` column per shift."""
    shift_names = list(SHIFTS)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*SCALAR_FIELDS, *(f"shift_{s}" for s in shift_names)])
        for r in records:
            writer.writerow(
                [r.get(k) for k in SCALAR_FIELDS] + [r["shifted"].get(s) for s in shift_names]
            )


def failed_lines(failed: list[dict]) -> list[str]:
    """One line per (norm, batch size) that could not train (or crashed), with the reason."""
    seen: dict[tuple[str, int], dict] = {}
    for r in failed:
        seen.setdefault((r["norm"], r["batch_size"]), r)
    return [
        f"- {norm} at batch {b}: "
        + (r["failed"] if "failed" in r else f"crashed ({r['crashed']}); run again on resume")
        for (norm, b), r in seen.items()
    ]


def _inline(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def markdown_to_html(markdown: str, folder: Path, title: str = "normlab compare") -> str:
    """The summary's Markdown (headings, paragraphs, lists, tables, images) as one
    self-contained HTML page: every image is embedded as a base64 PNG."""
    body: list[str] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            head, rest = rows[0], [r for r in rows[1:] if not set("".join(r)) <= set("-: ")]
            body.append("<table>")
            body.append("<tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>")
            for row in rest:
                body.append("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>")
            body.append("</table>")
            continue
        image = re.fullmatch(r"!\[(.*?)\]\((.+?)\)", line.strip())
        if image:
            path = folder / image.group(2)
            if path.exists():
                data = base64.b64encode(path.read_bytes()).decode("ascii")
                body.append(
                    f'<figure><img alt="{html.escape(image.group(1))}" '
                    f'src="data:image/png;base64,{data}"></figure>'
                )
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            body.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
        i += 1
    style = (
        "body{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}"
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{style}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def write_outputs(
    records: list[dict],
    out_dir: str | Path,
    experiments: list[str],
    header: str = "",
    failed: list[dict] | None = None,
    label: str = "",
) -> dict[str, Path]:
    """Write results.json, results.csv, summary.md, report.html and the figures; return
    their paths.

    `records` are finished runs; `failed` runs (a "failed" or "crashed" message, no
    accuracy) are listed in the summary only. `label` names the model and data on the
    figures.
    """
    from normlab.lab import claims_report, figures

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "results.json",
        "csv": out / "results.csv",
        "summary": out / "summary.md",
        "html": out / "report.html",
    }
    paths["json"].write_text(json.dumps(records, indent=1))
    write_csv(records, paths["csv"])
    everything, records = records, claims_report.main_records(records)
    ref = reference_batch(sorted({r["batch_size"] for r in records}))
    at_ref = [r for r in records if r["batch_size"] == ref]
    seeds = len({r["seed"] for r in records})
    text = [
        f"# normlab compare{': ' + header if header else ''}",
        "",
        f"{len(records)} runs, {seeds} seed(s) each; mean ± std over seeds. "
        "**Bold**: best in its column; ≈: difference within the seed-to-seed spread "
        "(no larger than the sum of the two standard deviations).",
        "",
    ]
    if "batch-size" in experiments:
        paths["batch_size_png"] = figures.batch_size_figure(records, out / "batch-size.png", label)
        text += [
            "## Test error (%) vs batch size",
            "",
            "Same epochs for every batch size; learning rate scaled linearly "
            "(lr = base_lr · batch / 32).",
            "",
            *batch_size_table(records),
            "",
            *batch_size_findings(records),
            "",
            "![error vs batch size](batch-size.png)",
            "",
        ]
    shifted = [r for r in at_ref if r["shifted"]]
    if "shift" in experiments and not shifted:
        reason = next((r["shifts_skipped"] for r in at_ref if "shifts_skipped" in r), "")
        text += [f"## Appearance shifts (batch {ref})", "", f"Skipped: {reason}.", ""]
    elif "shift" in experiments:
        paths["shift_png"] = figures.shift_figure(shifted, out / "shift.png", label)
        text += [
            f"## Test accuracy (%) under appearance shifts (batch {ref})",
            "",
            "Shifts are applied to test images only; training never sees them. "
            "≈: within the seed spread of batch norm.",
            "",
            *shift_table(shifted),
            "",
            "![accuracy under shifts](shift.png)",
            "",
        ]
    if "curves" in experiments:
        paths["curves_png"] = figures.curves_figure(at_ref, out / "curves.png", label)
        text += [
            f"## Training curves (batch {ref})",
            "",
            *curves_table(at_ref),
            "",
            "![training curves](curves.png)",
            "",
        ]
    text += claims_report.sections(everything, out, experiments, paths)
    if failed:
        text += ["## Runs that could not train", "", *failed_lines(failed), ""]
    wall = sum(r["wall_time"] for r in everything)
    text += [f"Total training time of these runs: {wall:.0f} s (summed over runs)."]
    summary = "\n".join(text) + "\n"
    paths["summary"].write_text(summary)
    paths["html"].write_text(markdown_to_html(summary, out, f"normlab compare: {header}"))
    return paths
