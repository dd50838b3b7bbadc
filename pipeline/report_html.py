"""The report page: PNG plots (matplotlib, Agg) and one static ``index.html`` that links them.

``write_report(stats, out_dir)`` writes::

    OUT/index.html            the page: no script, no external resource; open it from disk
    OUT/plots/*.png           one plot per section
    OUT/samples/KEY.jpg       contact sheet: overlay with labels drawn, full size
    OUT/samples/KEY.thumb.jpg its thumbnail (the sheet's <img>)
    OUT/samples/KEY.json      the sample's JSON, pretty-printed (what the key links to)
"""

from __future__ import annotations

import datetime
import html
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ssam.overlay import render_overlay

from .report import SCORE_EDGES, RunStats

TOP_LABELS = 50
THUMB_WIDTH_PX = 360
OK_COLOR, FAIL_COLOR, ALT_COLOR = "#2e8b57", "#c0392b", "#7f8c8d"


def _figure(width_in: float = 8.0, height_in: float = 3.2):
    import matplotlib

    matplotlib.use("Agg")  # no display: plots are files
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width_in, height_in), dpi=100)
    return plt, fig, ax


def _save(plt, fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return f"plots/{path.name}"


def _empty(ax, text: str = "nothing yet") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color=ALT_COLOR)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_accounting(stats: RunStats, path: Path) -> str:
    """Horizontal bars: written, then each failure reason, and rows still pending."""
    bars = [("written", stats.written, OK_COLOR)]
    bars += [(r, n, FAIL_COLOR) for r, n in stats.failures.most_common()]
    if stats.pending:
        bars.append(("pending", stats.pending, ALT_COLOR))
    plt, fig, ax = _figure(8, 0.9 + 0.32 * len(bars))
    y = np.arange(len(bars))[::-1]
    ax.barh(y, [b[1] for b in bars], color=[b[2] for b in bars])
    ax.set_yticks(y, [b[0] for b in bars])
    for yi, (_, n, _) in zip(y, bars, strict=True):
        ax.text(n, yi, f" {n}", va="center")
    ax.set_xlabel("input rows")
    ax.margins(x=0.12)
    return _save(plt, fig, path)


def plot_top_labels(stats: RunStats, path: Path) -> str:
    top = stats.labels.most_common(TOP_LABELS)
    plt, fig, ax = _figure(8, 1.0 + 0.2 * max(len(top), 3))
    if not top:
        _empty(ax, "no labelled masks")
        return _save(plt, fig, path)
    y = np.arange(len(top))[::-1]
    ax.barh(y, [n for _, n in top], color=OK_COLOR)
    ax.set_yticks(y, [label for label, _ in top], fontsize=8)
    ax.set_xlabel("masks")
    return _save(plt, fig, path)


def plot_long_tail(stats: RunStats, path: Path) -> str:
    """Masks per label against the label's rank, log-log: how fast the vocabulary thins out."""
    plt, fig, ax = _figure()
    counts = sorted(stats.labels.values(), reverse=True)
    if not counts:
        _empty(ax, "no labelled masks")
        return _save(plt, fig, path)
    ax.plot(np.arange(1, len(counts) + 1), counts, marker="." if len(counts) < 200 else None, color=OK_COLOR)
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):  # plain numbers, not 4x10^0
        axis.set_major_formatter(lambda v, _: f"{v:g}")
        axis.set_minor_formatter(lambda v, _: f"{v:g}" if len(counts) < 20 else "")
    ax.set_xlabel("label rank")
    ax.set_ylabel("masks")
    return _save(plt, fig, path)


def plot_masks_per_image(stats: RunStats, path: Path) -> str:
    plt, fig, ax = _figure()
    if not stats.masks_per_image:
        _empty(ax)
        return _save(plt, fig, path)
    xs = sorted(stats.masks_per_image)
    ax.bar(xs, [stats.masks_per_image[x] for x in xs], color=OK_COLOR)
    ax.set_xlabel("masks in the image")
    ax.set_ylabel("images")
    return _save(plt, fig, path)


def plot_histogram(series: list[tuple[str, np.ndarray, str]], xlabel: str, path: Path) -> str:
    """Stacked histograms over ``SCORE_EDGES`` (label scores, predicted IoU)."""
    plt, fig, ax = _figure()
    widths, bottom = np.diff(SCORE_EDGES), np.zeros(len(SCORE_EDGES) - 1)
    for name, hist, color in series:
        ax.bar(SCORE_EDGES[:-1], hist, widths, bottom=bottom, align="edge", color=color, label=name)
        bottom = bottom + hist
    ax.set_xlim(0, 1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("masks")
    if len(series) > 1:
        ax.legend()
    return _save(plt, fig, path)


def plot_sources(stats: RunStats, path: Path) -> str:
    """Per candidate source: candidates offered and labelled masks won."""
    plt, fig, ax = _figure()
    sources = sorted(set(stats.candidates_by_source) | set(stats.wins_by_source) | {"caption", "llm"})
    x = np.arange(len(sources))
    offered = [stats.candidates_by_source.get(s, 0) for s in sources]
    won = [stats.wins_by_source.get(s, 0) for s in sources]
    ax.bar(x - 0.2, offered, 0.4, label="candidates offered", color=ALT_COLOR)
    ax.bar(x + 0.2, won, 0.4, label="labelled masks won", color=OK_COLOR)
    ax.set_xticks(x, sources)
    ax.legend()
    return _save(plt, fig, path)


def plot_throughput(stats: RunStats, path: Path) -> str:
    """Rows per second of one worker, per stage (rows that reached the stage / its summed seconds)."""
    plt, fig, ax = _figure()
    stages = [s for s in stats.stage_seconds if stats.stage_seconds[s] > 0]
    if not stages:
        _empty(ax, "no stage timings")
        return _save(plt, fig, path)
    rates = [stats.stage_rows[s] / stats.stage_seconds[s] for s in stages]
    ax.bar(stages, rates, color=OK_COLOR)
    ax.set_yscale("log")
    ax.set_ylabel("rows/s per worker")
    return _save(plt, fig, path)


def write_sheet(stats: RunStats, out: Path) -> list[dict]:
    """Overlays of the contact-sheet samples; returns one dict per sample for the page."""
    folder = out / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    cards = []
    for s in stats.sheet:
        image = np.asarray(Image.open(io.BytesIO(s.jpeg)).convert("RGB"))
        smoke = bool(s.meta.get("provenance", {}).get("smoke"))
        overlay = render_overlay(image, s.meta["annotations"], smoke=smoke)
        overlay.save(folder / f"{s.key}.jpg", quality=88)
        thumb = overlay.copy()
        thumb.thumbnail((THUMB_WIDTH_PX, THUMB_WIDTH_PX * 4))
        thumb.save(folder / f"{s.key}.thumb.jpg", quality=85)
        (folder / f"{s.key}.json").write_text(json.dumps(s.meta, indent=1))
        labels = sorted({a["label"] for a in s.meta["annotations"] if a.get("label")})
        cards.append(
            dict(
                key=s.key,
                shard=s.shard,
                caption=s.meta["image"].get("caption", ""),
                masks=len(s.meta["annotations"]),
                labels=labels,
            )
        )
    return cards


CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1100px; padding: 0 1.5em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
.smoke { background: #c0392b; color: white; padding: 0.8em 1em; font-size: 1.3em; font-weight: bold; }
.running { background: #f39c12; color: white; padding: 0.6em 1em; font-weight: bold; }
table { border-collapse: collapse; } td, th { padding: 0.2em 0.8em; text-align: left; border-bottom: 1px solid #eee; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
img.plot { max-width: 100%; }
.sheet { display: grid; grid-template-columns: repeat(auto-fill, minmax(250px, 1fr)); gap: 12px; }
.sheet figure { margin: 0; border: 1px solid #ddd; padding: 6px; }
.sheet img { width: 100%; } .sheet figcaption { font-size: 0.85em; }
.muted { color: #777; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
"""


def _e(value) -> str:
    return html.escape(str(value))


def _table(rows: list[tuple], header: tuple | None = None) -> str:
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="n">{c}</td>' if isinstance(c, int | float) else f"<td>{_e(c)}</td>" for c in row
        )
        + "</tr>"
        for row in rows
    )
    return f"<table>{head}{body}</table>"


def _pct(n: int, d: int) -> str:
    return f"{100 * n / d:.1f}%" if d else "n/a"


def _status_html(stats: RunStats) -> str:
    out = []
    if stats.smoke:
        out.append(
            '<div class="smoke" id="smoke-banner">SMOKE RUN: made by tiny random models. '
            "Every mask and label in this report is meaningless; it shows the format and the plumbing only.</div>"
        )
    if not stats.finished:
        state = "no manifest yet" if stats.finished is None else "manifest says not finished"
        out.append(
            f'<div class="running">Run in progress or stopped ({state}): this report covers the '
            f"{len(stats.shards)} shard(s) committed when it was made.</div>"
        )
    return "\n".join(out)


def _accounting_rows(stats: RunStats) -> list[tuple]:
    rows = [("input rows", stats.input_rows if stats.input_rows is not None else "unknown")]
    rows += [("written", stats.written), ("failed", stats.failed)]
    if stats.pending is not None:
        rows.append(("pending (not in a committed shard yet)", stats.pending))
    rows += [(f"failed as {reason} (decontamination)", n) for reason, n in stats.dedup_counts().items()]
    return rows


def _failure_examples(stats: RunStats) -> str:
    rows = [
        (reason, ex["key"], ex["url"], ex["detail"])
        for reason, examples in sorted(stats.failure_examples.items())
        for ex in examples
    ]
    return _table(rows, ("reason", "key", "url", "detail")) if rows else '<p class="muted">No failures.</p>'


def _sheet_html(cards: list[dict]) -> str:
    if not cards:
        return '<p class="muted">No samples written yet.</p>'
    figs = []
    for c in cards:
        key = _e(c["key"])
        labels = ", ".join(c["labels"]) or "no labels"
        figs.append(
            f'<figure id="sample-{key}"><a href="samples/{key}.jpg"><img src="samples/{key}.thumb.jpg" '
            f'alt="overlay of sample {key}"></a><figcaption><a href="samples/{key}.json">{key}</a> '
            f'<span class="muted">shard {_e(c["shard"])}, {c["masks"]} masks</span><br>{_e(labels)}<br>'
            f'<span class="muted">{_e(c["caption"][:140])}</span></figcaption></figure>'
        )
    return '<div class="sheet">' + "\n".join(figs) + "</div>"


def write_report(stats: RunStats, out_dir: str | Path) -> Path:
    """Write ``index.html``, its plots and the contact sheet into ``out_dir``; return the page's path."""
    out = Path(out_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    p = out / "plots"
    plots = {
        "accounting": plot_accounting(stats, p / "accounting.png"),
        "top": plot_top_labels(stats, p / "labels_top50.png"),
        "tail": plot_long_tail(stats, p / "labels_long_tail.png"),
        "masks": plot_masks_per_image(stats, p / "masks_per_image.png"),
        "score": plot_histogram(
            [
                ("labelled", stats.score_hist_labelled, OK_COLOR),
                ("unlabelled (had candidates)", stats.score_hist_unlabelled, ALT_COLOR),
            ],
            "label_score (probability of the best candidate)",
            p / "label_score.png",
        ),
        "iou": plot_histogram(
            [("all masks", stats.iou_hist, OK_COLOR)], "predicted_iou", p / "predicted_iou.png"
        ),
        "sources": plot_sources(stats, p / "candidate_sources.png"),
        "throughput": plot_throughput(stats, p / "throughput.png"),
    }
    cards = write_sheet(stats, out)
    img = {k: f'<img class="plot" id="plot-{k}" src="{v}" alt="{k} plot">' for k, v in plots.items()}
    sources = sorted(set(stats.candidates_by_source) | set(stats.wins_by_source))
    source_rows = [
        (
            s,
            stats.candidates_by_source.get(s, 0),
            stats.images_by_source.get(s, 0),
            stats.wins_by_source.get(s, 0),
            _pct(stats.wins_by_source.get(s, 0), stats.labelled),
        )
        for s in sources
    ]
    stage_rows = [
        (
            s,
            stats.stage_rows[s],
            round(stats.stage_seconds[s], 2),
            round(stats.stage_rows[s] / stats.stage_seconds[s], 2),
        )
        for s in stats.stage_seconds
        if stats.stage_seconds[s] > 0
    ]
    prov = stats.provenance
    models = (
        f"SAM {prov.get('sam', {}).get('name')}, CLIP {prov.get('clip', {}).get('name')}, "
        f"LLM {prov.get('llm', {}).get('backend')}:{prov.get('llm', {}).get('model')}"
    )
    made = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{"[SMOKE] " if stats.smoke else ""}Report: {
        _e(stats.run_dir.name)
    }</title>
<link rel="icon" href="data:,"><style>{CSS}</style></head><body>
{_status_html(stats)}
<h1>Run report: {_e(stats.run_dir.name)}</h1>
<p class="muted">{_e(stats.run_dir)} &middot; {len(stats.shards)} committed shard(s) &middot; {
        _e(models)
    } &middot; made {made}</p>

<h2 id="accounting">Input accounting</h2>
{_table(_accounting_rows(stats))}
{img["accounting"]}
<h3>Failure examples</h3>
{_failure_examples(stats)}

<h2 id="masks">Masks</h2>
{
        _table(
            [
                ("masks", stats.masks),
                ("labelled", stats.labelled),
                ("share labelled", _pct(stats.labelled, stats.masks)),
                ("masks per image (mean)", round(stats.masks / stats.written, 2) if stats.written else "n/a"),
                ("images without candidates", stats.images_without_candidates),
            ]
        )
    }
<div class="pair"><div><h3>Masks per image</h3>{img["masks"]}</div>
<div><h3>Predicted IoU</h3>{img["iou"]}</div></div>

<h2 id="labels">Labels</h2>
<p>{len(stats.labels)} distinct labels.</p>
<h3>Top {TOP_LABELS}</h3>{img["top"]}
<div class="pair"><div><h3>Long tail</h3>{img["tail"]}</div>
<div><h3>Label score</h3>{img["score"]}</div></div>

<h2 id="sources">Candidate sources</h2>
{_table(source_rows, ("source", "candidates", "images with one", "labelled masks won", "share of labels"))}
{img["sources"]}

<h2 id="throughput">Per-stage throughput</h2>
{_table(stage_rows, ("stage", "rows", "seconds (summed over rows)", "rows/s per worker"))}
{img["throughput"]}

<h2 id="sheet">Contact sheet</h2>
<p class="muted">{
        len(cards)
    } sample(s) drawn uniformly from the run; click an overlay for full size, a key for its JSON.</p>
{_sheet_html(cards)}
</body></html>
"""
    index = out / "index.html"
    index.write_text(page)
    return index
