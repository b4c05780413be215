"""Tables, plot and HTML page for one or several scored folders (methods).

    write_score_outputs(result, out)          # what `python -m eval score` writes: scores.json + report
    write_report({"lora": r1, "singlora": r2}, out, reference=True)   # compare methods

Files written to the output folder:
    report.md        summary tables (all / objects / live, with the real-image bound), per subject,
                     settings, skipped items
    report.csv       the summary in long form: method, source, group, metric, mean, std, counts
    per_subject.csv  per_prompt.csv  per_image.csv
    report.json      every number of every method plus the settings that made it
    report.png       bar chart: one bar per method (and the real-image bound) per metric, std as error bar,
                     each value in a white box above its bar (below a negative one)
    report.html      the tables and the chart, then each subject's real images beside every method's
                     generations (relative paths)

`provenance` ({label: text}, optional) records where the numbers came from (base model, steps, seeds,
render settings, encoder checkpoints) at the top of report.md, report.html and in report.json.
"""

from __future__ import annotations

import csv
import html
import io
import json
import os
from pathlib import Path
from typing import Mapping, Optional
from urllib.parse import quote

from dreambooth_singlora.errors import UserError
from dreambooth_singlora.fileio import atomic_path, write_json_atomic, write_text_atomic
from dreambooth_singlora.prompts import subjects as all_subjects

from .metrics import GROUPS
from .score import FORMAT

METRIC_LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "dino_patch": "DINO patch (diag.)"}
METRIC_ORDER = ("dino", "clip_i", "clip_t", "dino_patch")
GROUP_TITLES = {"all": "All subjects", "object": "Objects", "live": "Live subjects"}

# docs/PROTOCOL.md's reference table: (method, DINO, CLIP-I, CLIP-T, source).
REFERENCE_ROWS = (
    ("Real images (upper bound)", 0.774, 0.885, None, "DreamBooth Table 1"),
    ("DreamBooth, Stable Diffusion (full fine-tune)", 0.668, 0.803, 0.305, "DreamBooth Table 1"),
    ("DreamBooth, Imagen", 0.696, 0.812, 0.306, "DreamBooth Table 1"),
    ("Textual Inversion, SD", 0.569, 0.780, 0.255, "DreamBooth Table 1"),
    ("Custom Diffusion", 0.643, 0.790, 0.305, "DreamCache Table 2"),
    ("SingLoRA paper: LoRA r8 (q,k)", 0.143, 0.677, 0.319, "SingLoRA Table 3"),
    ("SingLoRA paper: LoRA+ r8", 0.150, 0.688, 0.315, "SingLoRA Table 3"),
    ("SingLoRA paper: DoRA r8", 0.148, 0.687, 0.317, "SingLoRA Table 3"),
    ("SingLoRA paper: SingLoRA r8", 0.141, 0.677, 0.318, "SingLoRA Table 3"),
    ("SingLoRA paper: SingLoRA r16", 0.151, 0.690, 0.317, "SingLoRA Table 3"),
)


def label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def _fmt(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _fmt_ms(entry: Optional[dict]) -> str:
    if not entry or entry.get("mean") is None:
        return "-"
    return _fmt(entry["mean"]) + ("" if entry.get("std") is None else f" ± {_fmt(entry['std'])}")


def metric_order(results: Mapping[str, dict]) -> list:
    """Every metric of any method, the protocol's three first."""
    seen = []
    for r in results.values():
        seen += [m for m in r["metrics"] if m not in seen]
    return [m for m in METRIC_ORDER if m in seen] + [m for m in seen if m not in METRIC_ORDER]


_RESULT_KEYS = ("metrics", "summary", "subjects", "prompts", "bound", "images", "real_images", "scored", "skipped",
                "settings", "images_dir", "dataset_dir")


def load_results(path) -> dict:
    """A `score` output: its folder (holding scores.json) or the JSON file itself."""
    p = Path(path)
    if p.is_dir():
        p = p / "scores.json"
    if not p.is_file():
        raise UserError(f"no scores found at {str(path)!r}: give the output folder of `python -m eval score` "
                        "(holding scores.json) or the JSON file")
    try:
        result = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"could not read {str(p)!r}: {e}") from None
    if not isinstance(result, dict) or result.get("format") != FORMAT:
        raise UserError(f"{str(p)!r} is not a scores file of this tool (format {FORMAT!r})")
    missing = [k for k in _RESULT_KEYS if k not in result]
    if missing:
        raise UserError(f"{str(p)!r} is incomplete (no {', '.join(missing)}): score the folder again")
    return result


def _bound_rows(results: Mapping[str, dict]) -> list:
    """[(row label, method name)] for the real-image bound: one row if every method shares it."""
    unique = {}
    for name, r in results.items():
        key = json.dumps(r["bound"]["groups"], sort_keys=True)
        unique.setdefault(key, []).append(name)
    if len(unique) == 1:
        return [("Real images (upper bound)", next(iter(results)))]
    return [(f"Real images (upper bound, subjects of {', '.join(names)})", names[0]) for names in unique.values()]


# ---------------------------------------------------------------------------------------------
# Markdown

def _md_table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_rows(results: Mapping[str, dict], group: str, metrics: list) -> list:
    """Rows [label, <metric cells>, images, subjects] for one group, methods then the bound."""
    rows = []
    for name, r in results.items():
        g = r["summary"][group]
        first = g[r["metrics"][0]]
        rows.append([name] + [_fmt_ms(g.get(m)) for m in metrics] + [first["n_images"], first["n_subjects"]])
    for row_label, name in _bound_rows(results):
        b = results[name]["bound"]["groups"][group]
        first = next(iter(b.values()), {})
        rows.append([row_label] + [_fmt_ms(b.get(m)) for m in metrics]
                    + [f"{first.get('n_images', 0)} real", first.get("n_subjects", 0)])
    return rows


HOLDOUT_HEADER = ["Method", "Group", "Metric", "vs training photos", "vs held-out photos", "gap (train - held-out)",
                  "Subjects"]


def holdout_rows(results: Mapping[str, dict]) -> list:
    """Rows of HOLDOUT_HEADER for every method whose adapters held photos out (eval.holdout)."""
    rows = []
    for name, r in results.items():
        held = r.get("holdout")
        if not held:
            continue
        for group in GROUPS:
            for m in held["image_metrics"]:
                g = held["summary"][group]
                if g[f"{m}_train"]["mean"] is None:
                    continue
                rows.append([name, group, label(m), _fmt_ms(g[f"{m}_train"]), _fmt_ms(g[f"{m}_heldout"]),
                             _fmt_ms(g[f"{m}_gap"]), g[f"{m}_gap"]["n_subjects"]])
    return rows


HOLDOUT_NOTE = ("Subjects whose adapter recorded held-out photos (trainer --holdout): the same generations scored "
                "against the photos the adapter trained on and against the photos it never saw; gap = train - "
                "held-out, mean over subjects ± std across subjects. The tables above use all photos (the protocol).")


def provenance_lines(provenance: Optional[Mapping[str, str]]) -> list:
    """Markdown lines for where the numbers came from; a run off the protocol says so first."""
    if not provenance:
        return []
    off = provenance.get("differs from the protocol")
    lines = ["## Where these numbers came from", ""]
    if off and off != "nothing":
        lines += [f"**Not a protocol run: {off}. These numbers are not comparable with published ones.**", ""]
    return lines + [f"- {k}: {v}" for k, v in provenance.items()] + [""]


def markdown(results: Mapping[str, dict], reference: bool = False,
             provenance: Optional[Mapping[str, str]] = None) -> str:
    """The whole report as Markdown."""
    metrics = metric_order(results)
    header = ["Method"] + [label(m) for m in metrics] + ["Images", "Subjects"]
    out = ["# Subject fidelity (DreamBooth protocol)", "",
           "Raw cosine similarities of L2-normalised features (no x100, no clamp). Each cell: mean of the "
           "subject means ± their sample standard deviation across subjects. See docs/EVAL.md and "
           "docs/PROTOCOL.md.", ""]
    out += provenance_lines(provenance)
    for group in GROUPS:
        out += [f"## {GROUP_TITLES[group]}", "", _md_table(header, summary_rows(results, group, metrics)), ""]
    held = holdout_rows(results)
    if held:
        out += ["## Held-out photos", "", HOLDOUT_NOTE, "", _md_table(HOLDOUT_HEADER, held), ""]
        for name, r in results.items():
            if r.get("holdout"):
                out.append(f"- {name}: " + "; ".join(f"{s}: {', '.join(f)}" for s, f in r["holdout"]["files"].items()))
        out.append("")
    if reference:
        out += ["## Published reference numbers (other setups; compare with care)", "",
                _md_table(["Method", "DINO", "CLIP-I", "CLIP-T", "Source"],
                          [[n, _fmt(d), _fmt(c), _fmt(t), s] for n, d, c, t, s in REFERENCE_ROWS]), ""]
    out += ["## Per subject", "", _md_table(*per_subject_table(results, metrics)), ""]
    out += ["## Settings", ""] + _settings_lines(results) + [""]
    out += ["## Scored and skipped", ""]
    for name, r in results.items():
        s = r["scored"]
        out.append(f"- **{name}**: scored {s['images']} images ({s['subjects']} subjects, {s['prompts']} prompts) "
                   f"from `{r['images_dir']}`; {len(r['skipped'])} problems")
        out += [f"  - {p['kind']}: `{p['path']}`: {p['message']}" for p in r["skipped"]]
    return "\n".join(out) + "\n"


def per_subject_table(results: Mapping[str, dict], metrics: list):
    names = list(results)
    order = [s for s in all_subjects() if any(s in r["subjects"] for r in results.values())]
    header = ["Subject", "Kind"] + [f"{n} {label(m)}" if len(names) > 1 else label(m) for n in names for m in metrics]
    header += ["Real " + label(m) for m in metrics if m in results[names[0]]["bound"]["metrics"]]
    rows = []
    for s in order:
        kind = next(r["subjects"][s]["kind"] for r in results.values() if s in r["subjects"])
        row = [s, kind]
        for n in names:
            subj = results[n]["subjects"].get(s, {})
            row += [_fmt(subj.get(m)) for m in metrics]
        bound = next((r["bound"]["subjects"][s] for r in results.values() if s in r["bound"]["subjects"]), {})
        row += [_fmt(bound.get(m)) for m in metrics if m in results[names[0]]["bound"]["metrics"]]
        rows.append(row)
    return header, rows


def _scalars(obj, limit: int = 16) -> str:
    """The top-level scalar fields of a settings JSON, briefly."""
    if not isinstance(obj, dict):
        return f"a JSON {type(obj).__name__}"
    if isinstance(obj.get("settings"), dict):  # generate's index.json: {"settings": {...}, "images": [...]}
        obj = obj["settings"]
    items = [f"{k}={v}" for k, v in obj.items() if isinstance(v, (str, int, float, bool)) or v is None]
    more = len(obj) - len(items[:limit])
    return ", ".join(items[:limit]) + (f" (+{more} more fields)" if more > 0 else "") if items else f"{len(obj)} fields"


def _describe_encoder(settings: dict) -> str:
    keys = ("library", "model", "pretrained", "quick_gelu", "feature", "transform", "patch_tokens")
    return ", ".join(f"{k}={settings[k]}" for k in keys if k in settings)


def _comparable(r: dict) -> str:
    s = r["settings"]
    return json.dumps(dict(encoders=s["encoders"], protocol=s["protocol"]), sort_keys=True, default=str)


def _settings_lines(results: Mapping[str, dict]) -> list:
    lines = []
    if len({_comparable(r) for r in results.values()}) > 1:
        lines.append("- **WARNING: the methods were scored with different encoders or protocol choices; "
                     "their numbers are not directly comparable.**")
    for name, r in results.items():
        s = r["settings"]
        lines.append(f"- **{name}**")
        for enc, es in s["encoders"].items():
            lines.append(f"  - encoder {enc}: {_describe_encoder(es)}")
        p = s["protocol"]
        lines.append(f"  - CLIP-T text: {p['clip_t_text']} (identifier {p['identifier']!r}); {p['std']}")
        gen = s.get("generation") or {}
        if not gen:
            lines.append("  - generation settings: none found in the images folder (record them: they move every number)")
        by_summary = {}
        for fname, content in gen.items():
            by_summary.setdefault(_scalars(content), []).append(fname)
        for summary, fnames in by_summary.items():
            shown = ", ".join(f"`{f}`" for f in fnames[:3]) + (f" and {len(fnames) - 3} more" if len(fnames) > 3 else "")
            lines.append(f"  - generation settings {shown} (all of it in report.json): {summary}")
    return lines


# ---------------------------------------------------------------------------------------------
# CSV

def _csv_text(header: list, rows: list) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def csv_tables(results: Mapping[str, dict]) -> dict:
    """{file name: CSV text} for report.csv, per_subject.csv, per_prompt.csv, per_image.csv."""
    metrics = metric_order(results)
    summary = []
    for name, r in results.items():
        for group in GROUPS:
            for m in r["metrics"]:
                e = r["summary"][group][m]
                summary.append([name, "generated", group, m, e["mean"], e["std"], e["n_subjects"], e["n_images"]])
            for m in r["bound"]["metrics"]:
                e = r["bound"]["groups"][group][m]
                summary.append([name, "real_bound", group, m, e["mean"], e["std"], e["n_subjects"], e["n_images"]])
            for m in (r.get("holdout") or {}).get("metrics", ()):
                e = r["holdout"]["summary"][group][m]
                summary.append([name, "holdout", group, m, e["mean"], e["std"], e["n_subjects"], e["n_images"]])
    per_subject, per_prompt, per_image = [], [], []
    for name, r in results.items():
        for s, v in r["subjects"].items():
            per_subject.append([name, s, v["kind"], v["n_prompts"], v["n_images"]] + [v.get(m) for m in metrics])
            for p, pv in r["prompts"][s].items():
                per_prompt.append([name, s, v["kind"], p, pv["n_images"]] + [pv.get(m) for m in metrics])
        for rec in r["images"]:
            per_image.append([name, rec["subject"], rec["kind"], rec["prompt"], rec["path"]]
                             + [rec.get(m) for m in metrics])
    return {
        "report.csv": _csv_text(["method", "source", "group", "metric", "mean", "std", "n_subjects", "n_images"],
                                summary),
        "per_subject.csv": _csv_text(["method", "subject", "kind", "n_prompts", "n_images"] + metrics, per_subject),
        "per_prompt.csv": _csv_text(["method", "subject", "kind", "prompt", "n_images"] + metrics, per_prompt),
        "per_image.csv": _csv_text(["method", "subject", "kind", "prompt", "path"] + metrics, per_image),
    }


# ---------------------------------------------------------------------------------------------
# Plot

def bar_chart(results: Mapping[str, dict], path) -> None:
    """Grouped bars: per metric, one bar per method plus the real-image bound; std as error bars."""
    from matplotlib.figure import Figure  # the object API: the caller's pyplot backend is left as it is

    metrics = metric_order(results)
    series = [(name, {m: r["summary"]["all"].get(m) for m in metrics}) for name, r in results.items()]
    for row_label, name in _bound_rows(results):
        series.append((row_label, {m: results[name]["bound"]["groups"]["all"].get(m) for m in metrics}))
    width = 0.8 / len(series)
    fig = Figure(figsize=(max(6.0, 1.5 + len(metrics) * len(series) * 0.5), 5.0))
    ax = fig.subplots()
    low, high = 0.0, 1.0
    box = dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none", alpha=0.9)
    for i, (name, values) in enumerate(series):
        xs, ys, es = [], [], []
        for j, m in enumerate(metrics):
            e = values.get(m)
            if e and e.get("mean") is not None:
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(e["mean"])
                es.append(e["std"] or 0.0)
                low = min(low, e["mean"] - (e["std"] or 0.0))
                high = max(high, e["mean"] + (e["std"] or 0.0))
        ax.bar(xs, ys, width, yerr=es, capsize=3, label=name, hatch="//" if name.startswith("Real") else None)
        for x, y, err in zip(xs, ys, es):  # the value past the end of its error bar, on white: readable on
            up = y >= 0                    # hatched bars, negative bars and any bar colour
            ax.annotate(f"{y:.3f}", (x, y + err if up else y - err), xytext=(0, 3 if up else -3),
                        textcoords="offset points", ha="center", va="bottom" if up else "top", rotation=90,
                        fontsize=7, bbox=box, zorder=5)
    ax.set_xticks(range(len(metrics)), [label(m) for m in metrics])
    ax.set_ylabel("cosine similarity (mean of subject means)")
    ax.set_ylim(low - 0.2 if low < 0 else 0.0, high + 0.15)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_title("Subject fidelity (DreamBooth protocol)\nerror bars: std across subjects", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=min(3, len(series)), frameon=False)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


# ---------------------------------------------------------------------------------------------
# HTML

_CSS = """body{font-family:sans-serif;margin:1em 2em}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top;font-size:13px}img{margin:1px}
.real img{border:2px solid #4a4}.num{font-family:monospace}"""


def _src(path: Path, out_dir: Path) -> str:
    return quote(Path(os.path.relpath(path, out_dir)).as_posix())


def _img(path: Path, out_dir: Path, title: str, size: int = 96) -> str:
    src = _src(path, out_dir)
    return (f'<a href="{html.escape(src)}"><img loading="lazy" src="{html.escape(src)}" width="{size}" '
            f'height="{size}" style="object-fit:cover" title="{html.escape(title)}" alt="{html.escape(title)}"></a>')


def html_page(results: Mapping[str, dict], out_dir, provenance: Optional[Mapping[str, str]] = None,
              chart: Optional[str] = "report.png") -> str:
    """The tables, the bar chart (`chart`, a file beside the page) and each subject's real images beside
    every method's generations, with the scores."""
    out_dir = Path(out_dir).resolve()
    metrics = metric_order(results)
    header = ["Method"] + [label(m) for m in metrics] + ["Images", "Subjects"]
    parts = ["<!doctype html><meta charset='utf-8'><title>Subject fidelity</title>", f"<style>{_CSS}</style>",
             "<h1>Subject fidelity (DreamBooth protocol)</h1>",
             "<p>Raw cosine similarities; mean of subject means &plusmn; std across subjects.</p>"]
    if provenance:
        off = provenance.get("differs from the protocol")
        if off and off != "nothing":
            parts.append(f"<p><b>Not a protocol run: {html.escape(str(off))}. These numbers are not comparable "
                         "with published ones.</b></p>")
        parts.append("<ul>" + "".join(f"<li>{html.escape(str(k))}: {html.escape(str(v))}</li>"
                                      for k, v in provenance.items()) + "</ul>")
    for group in GROUPS:
        rows = summary_rows(results, group, metrics)
        parts.append(f"<h3>{GROUP_TITLES[group]}</h3><table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header)
                     + "</tr>" + "".join("<tr>" + "".join(f"<td class=num>{html.escape(str(c))}</td>" for c in row)
                                         + "</tr>" for row in rows) + "</table>")
    held = holdout_rows(results)
    if held:
        parts.append(f"<h3>Held-out photos</h3><p>{html.escape(HOLDOUT_NOTE)}</p><table><tr>"
                     + "".join(f"<th>{html.escape(h)}</th>" for h in HOLDOUT_HEADER) + "</tr>"
                     + "".join("<tr>" + "".join(f"<td class=num>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                               for row in held) + "</table>")
    if chart:
        parts.append(f'<p><img src="{html.escape(quote(chart))}" alt="bar chart of every metric" '
                     'style="max-width:100%"></p>')
    order = [s for s in all_subjects() if any(s in r["subjects"] for r in results.values())]
    parts.append("<p>Subjects: " + " ".join(f'<a href="#{s}">{s}</a>' for s in order) + "</p>")
    for s in order:
        first = next(r for r in results.values() if s in r["subjects"])
        dataset = Path(first["dataset_dir"])
        reals = "".join(_img(dataset / p, out_dir, p) for p in first["real_images"].get(s, []))
        parts.append(f'<h2 id="{s}">{s} ({first["subjects"][s]["kind"]})</h2><div class=real>Real images: {reals}</div>')
        scores = "; ".join(f"{n}: " + ", ".join(f"{label(m)} {_fmt(r['subjects'][s].get(m))}" for m in r["metrics"])
                           for n, r in results.items() if s in r["subjects"])
        parts.append(f"<p class=num>{html.escape(scores)}</p>")
        prompts = []
        for r in results.values():
            prompts += [p for p in r["prompts"].get(s, {}) if p not in prompts]
        by_prompt = {n: {} for n in results}
        for n, r in results.items():
            for rec in r["images"]:
                if rec["subject"] == s:
                    by_prompt[n].setdefault(rec["prompt"], []).append(rec)
        parts.append("<table><tr><th>Prompt</th>" + "".join(f"<th>{html.escape(n)}</th>" for n in results) + "</tr>")
        for p in prompts:
            cells = []
            for n, r in results.items():
                recs = by_prompt[n].get(p, [])
                imgs = "".join(_img(Path(r["images_dir"]) / rec["path"], out_dir,
                                    ", ".join(f"{label(m)} {_fmt(rec[m])}" for m in r["metrics"])) for rec in recs)
                pv = r["prompts"].get(s, {}).get(p)
                nums = ", ".join(f"{label(m)} {_fmt(pv[m])}" for m in r["metrics"]) if pv else "not scored"
                cells.append(f"<td>{imgs}<br><span class=num>{html.escape(nums)}</span></td>")
            parts.append(f"<tr><td>{html.escape(p)}</td>{''.join(cells)}</tr>")
        parts.append("</table>")
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------
# Writers

def write_report(results: Mapping[str, dict], output_dir, *, reference: bool = False,
                 provenance: Optional[Mapping[str, str]] = None) -> dict:
    """Write report.md/.csv/.json/.png/.html and the per-subject/prompt/image CSVs for the methods.

    results: {method name: score_folder(...) result}; provenance: {label: text} of where the numbers
    came from (printed first). Returns {kind: path written}.
    """
    if not results:
        raise UserError("no results to report")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    paths["md"] = out / "report.md"
    write_text_atomic(paths["md"], markdown(results, reference=reference, provenance=provenance))
    for fname, text in csv_tables(results).items():
        paths[fname] = out / fname
        write_text_atomic(paths[fname], text)
    paths["json"] = out / "report.json"
    write_json_atomic(paths["json"], dict(
        format=FORMAT, methods=dict(results), comparable=len({_comparable(r) for r in results.values()}) == 1,
        reference=[dict(method=n, dino=d, clip_i=c, clip_t=t, source=s) for n, d, c, t, s in REFERENCE_ROWS]
        if reference else None, provenance=dict(provenance) if provenance else None))
    paths["png"] = out / "report.png"
    bar_chart(results, paths["png"])
    paths["html"] = out / "report.html"
    write_text_atomic(paths["html"], html_page(results, out, provenance, chart=paths["png"].name))
    return paths


def write_score_outputs(result: dict, output_dir, name: Optional[str] = None, *, reference: bool = False) -> dict:
    """What `score` writes: scores.json (the input of `report`) and the one-method report."""
    out = Path(output_dir)
    scores = out / "scores.json"
    write_json_atomic(scores, result)
    name = name or Path(result["images_dir"]).name or "method"
    return dict(scores=scores, **write_report({name: result}, out, reference=reference))


def bound_markdown(bound: dict) -> str:
    """The real-image bound as a small Markdown table (groups, then subjects)."""
    metrics = [m for m in METRIC_ORDER if m in bound["metrics"]] + [m for m in bound["metrics"] if m not in METRIC_ORDER]
    rows = []
    for group in GROUPS:
        g = bound["groups"][group]
        first = g[metrics[0]]
        rows.append([GROUP_TITLES[group]] + [_fmt_ms(g[m]) for m in metrics] + [first["n_subjects"], first["n_images"]])
    table = _md_table(["Real-image bound"] + [label(m) for m in metrics] + ["Subjects", "Real images"], rows)
    per = _md_table(["Subject", "Kind", "Real images"] + [label(m) for m in metrics],
                    [[s, v["kind"], v["n_images"]] + [_fmt(v[m]) for m in metrics] for s, v in bound["subjects"].items()])
    return f"{table}\n\n{per}\n"


def write_bound(bound: dict, output_file) -> Path:
    """The bound's JSON at output_file and its Markdown beside it (same name, .md)."""
    path = Path(output_file)
    if path.suffix.lower() == ".md":
        raise UserError(f"--output {str(output_file)!r} is the JSON file (the Markdown goes beside it): use .json")
    write_json_atomic(path, bound)
    write_text_atomic(path.with_suffix(".md"), bound_markdown(bound))
    return path
