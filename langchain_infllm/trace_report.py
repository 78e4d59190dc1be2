"""Self-contained HTML report of a retrieval trace (what the model recalled, step by step).

``save_report(handler.to_dict(), "trace.html")`` writes ``trace.html`` and, next to it,
``trace.png``: a heat map of agent step (rows) by history token position (columns),
coloured by how often the blocks covering each position were selected. The HTML embeds
the same PNG (base64), lists the messages behind the hottest blocks and tabulates per
step what was reused, computed, hit and copied. It needs no network: CSS and JS are
inline. Needs matplotlib (the ``agents`` extra); rendering uses the Agg canvas directly
and never touches pyplot's global state.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from langchain_infllm.trace_data import jsonable, map_blocks_to_messages, step_blocks

__all__ = ["heat_matrix", "hottest_blocks", "render_heatmap_png", "save_report"]

MAX_BINS = 1000
"""Most columns of the heat map; longer histories are binned (mean selections per token)."""


# ============================================================================ data


def _steps(handler_data: Mapping[str, Any] | Any) -> list[Mapping[str, Any]]:
    data = handler_data.to_dict() if hasattr(handler_data, "to_dict") else handler_data
    return list(data.get("steps") or [])


def _summary(step: Mapping[str, Any]) -> Mapping[str, Any]:
    return step.get("summary") or {}


def _context_length(step: Mapping[str, Any], blocks: Sequence[Mapping[str, int]]) -> int:
    summary = _summary(step)
    length = int(summary.get("prompt_tokens") or 0) + int(summary.get("generated_tokens") or 0)
    if blocks:
        length = max(length, max(int(b["end"]) for b in blocks))
    return length


def heat_matrix(
    steps: Sequence[Mapping[str, Any]], max_bins: int = MAX_BINS
) -> tuple[np.ndarray, float, int]:
    """(matrix, tokens per column, total length) for the heat map.

    Row ``k`` is step ``k``; a cell holds the mean number of selections of the tokens it
    covers. Cells past a step's own context length are NaN (drawn grey).
    """
    per_step = [step_blocks(step) for step in steps]
    lengths = [_context_length(step, blocks) for step, blocks in zip(steps, per_step, strict=True)]
    total = max(lengths, default=0)
    n_bins = max(1, min(max_bins, total))
    width = total / n_bins if total else 1.0
    matrix = np.full((len(steps), n_bins), np.nan)
    for row, (blocks, length) in enumerate(zip(per_step, lengths, strict=True)):
        covered = min(n_bins, math.ceil(length / width)) if length else 0
        matrix[row, :covered] = 0.0
        for block in blocks:
            lo, hi = int(block["start"]) / width, int(block["end"]) / width
            for col in range(math.floor(lo), min(n_bins, math.ceil(hi))):
                overlap = min(hi, col + 1) - max(lo, col)
                if overlap > 0:
                    matrix[row, col] += block["count"] * overlap
    return matrix, width, total


def hottest_blocks(handler_data: Mapping[str, Any] | Any, limit: int = 15) -> list[dict[str, Any]]:
    """Blocks (by token span) most selected over the whole run, with their messages."""
    steps = _steps(handler_data)
    totals: dict[tuple[int, int], dict[str, Any]] = {}
    texts: dict[tuple[int, int], str] = {}
    for step in steps:
        for block in _summary(step).get("top_blocks") or []:
            if block.get("text"):
                texts[(int(block["start"]), int(block["end"]))] = str(block["text"])
        for payload in step.get("retrievals") or []:
            for span, text in zip(
                payload.get("block_spans") or [], payload.get("block_texts") or [], strict=False
            ):
                if text:
                    texts[(int(span[0]), int(span[1]))] = str(text)
        for block in step_blocks(step):
            key = (block["start"], block["end"])
            entry = totals.setdefault(key, {"count": 0, "steps": [], "last": step})
            entry["count"] += block["count"]
            entry["steps"].append(int(step.get("index", len(entry["steps"]))))
            entry["last"] = step
    ranked = sorted(totals.items(), key=lambda item: (-item[1]["count"], item[0]))[:limit]
    out = []
    for (start, end), entry in ranked:
        last = entry["last"]
        summary = _summary(last)
        owners = map_blocks_to_messages(
            [{"start": start, "end": end, "count": entry["count"]}],
            summary.get("message_spans"),
            prompt_tokens=summary.get("prompt_tokens"),
            messages=last.get("messages"),
        )
        out.append(
            {
                "start": start,
                "end": end,
                "count": entry["count"],
                "steps": entry["steps"],
                "text": texts.get((start, end), ""),
                "messages": [
                    {k: o[k] for k in ("index", "role", "name", "tool_call_id", "preview")}
                    for o in owners
                ],
            }
        )
    return out


# ============================================================================ figure


Marker = tuple[str, int, int]
"""A labelled span of history token positions ``(label, start, end)``, e.g. where a
planted fact sits, drawn over the heat map so a reader sees whether recall hit it."""


def render_heatmap_png(
    handler_data: Mapping[str, Any] | Any, markers: Sequence[Marker] = ()
) -> bytes:
    """The heat map as PNG bytes (matplotlib Agg canvas; no pyplot)."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = _steps(handler_data)
    matrix, _, total = heat_matrix(steps)
    height = min(9.0, 2.2 + 0.28 * max(1, len(steps)))
    fig = Figure(figsize=(11.0, height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    cmap = colormaps["viridis"].with_extremes(bad="#e4e4e4")
    if steps and total and np.nanmax(matrix) > 0:
        image = ax.imshow(
            np.ma.masked_invalid(matrix),
            aspect="auto",
            interpolation="nearest",
            cmap=cmap,
            vmin=0.0,
            extent=(0.0, float(total), len(steps) - 0.5, -0.5),
        )
        fig.colorbar(image, ax=ax, pad=0.01, label="selections per token (all layers)")
        last = next((s for s in reversed(steps) if _summary(s).get("message_spans")), None)
        if last is not None:
            starts = sorted({int(s["start"]) for s in _summary(last)["message_spans"]})
            ax.vlines(
                starts,
                -0.5,
                len(steps) - 0.5,
                colors="white",
                linewidth=0.6,
                alpha=0.35,
                linestyles="dotted",
            )
    else:
        ax.text(
            0.5, 0.5, "no retrievals recorded", ha="center", va="center", transform=ax.transAxes
        )
    for number, (_label, begin, finish) in enumerate(markers, start=1):
        ax.axvspan(begin, max(finish, begin + 1), color="red", alpha=0.25, linewidth=0)
        ax.axvline(begin, color="red", linewidth=0.8)
        ax.annotate(f"F{number}", (begin, -0.5), xytext=(2, 2), textcoords="offset points",
                    color="red", fontsize=8, annotation_clip=False)
    ax.set_xlabel("history token position" + ("  (red: planted facts F1, F2, ...)"
                                              if markers else ""))
    ax.set_ylabel("agent step")
    ax.set_title("Recalled context per agent step")
    if steps and len(steps) <= 40:
        ax.set_yticks(range(len(steps)))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


# ============================================================================ html

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:16px 24px;color:#1d1d1f;
background:#fff}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:22px 0 6px}
.meta{color:#555;font-size:13px;margin-bottom:10px}
#heatmap{display:block;width:100%;max-width:1100px;border:1px solid #ddd}
table{border-collapse:collapse;font-size:12px;margin-top:4px}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top;
white-space:nowrap}td.pv,td.txt{white-space:normal}
th{background:#f3f3f3;cursor:pointer;user-select:none}td.n{text-align:right;
font-variant-numeric:tabular-nums}
.role{font-weight:600}.pv{color:#333;max-width:520px}.txt{font-family:monospace;color:#444;
max-width:360px}
details{margin:3px 0;font-size:12px}summary{cursor:pointer}
.muted{color:#888}
"""

_JS = """
document.querySelectorAll('table.sortable th').forEach(function(th, col){
  th.addEventListener('click', function(){
    var table = th.closest('table'), body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var asc = th.dataset.dir !== 'asc'; th.dataset.dir = asc ? 'asc' : 'desc';
    rows.sort(function(a, b){
      var x = a.cells[col].dataset.v || a.cells[col].textContent;
      var y = b.cells[col].dataset.v || b.cells[col].textContent;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return asc ? c : -c;
    });
    rows.forEach(function(r){ body.appendChild(r); });
  });
});
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # unreachable


def _who(entry: Mapping[str, Any]) -> str:
    role = _e(entry.get("role"))
    parts = [f'<span class="role">{role}</span>']
    if entry.get("index") is not None:
        parts.append(f"#{_e(entry['index'])}")
    if entry.get("name"):
        parts.append(_e(entry["name"]))
    if entry.get("tool_call_id"):
        parts.append(f'<span class="muted">[{_e(entry["tool_call_id"])}]</span>')
    return " ".join(parts)


def _num(value: Any, text: str | None = None) -> str:
    shown = text if text is not None else ("" if value is None else str(value))
    return f'<td class="n" data-v="{_e(value)}">{_e(shown)}</td>'


def _step_rows(steps: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for position, step in enumerate(steps):
        s = _summary(step)
        hits, misses = int(s.get("cache_hits") or 0), int(s.get("cache_misses") or 0)
        rate = f"{hits / (hits + misses):.0%}" if hits + misses else ""
        recalled = step.get("recalled_messages")
        if recalled is None:
            recalled = map_blocks_to_messages(
                step_blocks(step),
                s.get("message_spans"),
                prompt_tokens=s.get("prompt_tokens"),
                messages=step.get("messages"),
            )
        top = recalled[0] if recalled else None
        top_html = f"{_who(top)} {_e(top.get('preview'))}" if top else ""
        bytes_copied = int(s.get("bytes_copied") or 0)
        seconds = s.get("seconds")
        rows.append(
            "<tr>"
            + _num(step.get("index", position))
            + f"<td>{_e(s.get('session_id') or step.get('thread_id') or '')}</td>"
            + _num(s.get("prompt_tokens"))
            + _num(s.get("tokens_reused"))
            + _num(s.get("tokens_computed"))
            + _num(s.get("generated_tokens"))
            + _num(s.get("retrievals"))
            + _num(hits)
            + _num(misses)
            + _num(hits / (hits + misses) if hits + misses else "", rate)
            + _num(bytes_copied, _bytes(bytes_copied))
            + _num(s.get("blocks_in_memory"))
            + _num(seconds, "" if seconds is None else f"{float(seconds):.3f}")
            + f'<td class="pv">{top_html}{_e(step.get("error") or "")}</td>'
            + "</tr>"
        )
    return "\n".join(rows)


def _hot_rows(hot: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for block in hot:
        owners = block["messages"] or [{"role": "unknown", "index": None, "preview": ""}]
        who = "<br>".join(f"{_who(o)} {_e(o.get('preview'))}" for o in owners[:3])
        steps = ", ".join(str(s) for s in block["steps"][:12])
        if len(block["steps"]) > 12:
            steps += ", …"
        rows.append(
            "<tr>"
            + _num(block["start"], f"{block['start']}–{block['end']}")
            + _num(block["count"])
            + f"<td>{_e(steps)}</td>"
            + f'<td class="pv">{who}</td>'
            + f'<td class="txt">{_e(block["text"])}</td>'
            + "</tr>"
        )
    return "\n".join(rows)


def _recalled_details(steps: Sequence[Mapping[str, Any]], limit: int = 8) -> str:
    parts = []
    for position, step in enumerate(steps):
        recalled = step.get("recalled_messages")
        if recalled is None:
            s = _summary(step)
            recalled = map_blocks_to_messages(
                step_blocks(step),
                s.get("message_spans"),
                prompt_tokens=s.get("prompt_tokens"),
                messages=step.get("messages"),
            )
        if not recalled:
            continue
        items = "".join(
            f"<li>{_who(r)} <span class='muted'>({_e(r['count'])} selections, "
            f"{_e(r['tokens'])} tokens)</span> {_e(r.get('preview'))}</li>"
            for r in recalled[:limit]
        )
        parts.append(
            f"<details><summary>step {_e(step.get('index', position))}: "
            f"{len(recalled)} message(s) recalled</summary><ol>{items}</ol></details>"
        )
    return "\n".join(parts) or "<p class='muted'>no retrievals recorded</p>"


def _embedded_json(steps: Sequence[Mapping[str, Any]]) -> str:
    light = []
    for step in steps:
        copy = {k: v for k, v in step.items() if k != "retrievals"}
        copy["retrieval_events"] = len(step.get("retrievals") or [])
        light.append(copy)
    text = json.dumps(jsonable({"steps": light}), allow_nan=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _marker_list(markers: Sequence[Marker]) -> str:
    if not markers:
        return ""
    items = "".join(
        f"<li>F{i}: tokens {begin}-{end}: {_e(label)}</li>"
        for i, (label, begin, end) in enumerate(markers, start=1)
    )
    return f'<h2>Planted facts (red on the map)</h2><ul id="markers">{items}</ul>'


def save_report(
    handler_data: Mapping[str, Any] | Any,
    path: str | Path,
    *,
    title: str = "InfLLM retrieval trace",
    markers: Sequence[Marker] = (),
) -> Path:
    """Write ``path`` (HTML) and ``<stem>.png`` next to it; returns the HTML path.

    ``handler_data`` is :meth:`RetrievalTraceHandler.to_dict` output (or the handler);
    ``markers`` are labelled history spans to highlight (planted facts, say).
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    steps = _steps(handler_data)
    png = render_heatmap_png({"steps": steps}, markers)
    out.with_suffix(".png").write_bytes(png)
    hot = hottest_blocks({"steps": steps})
    sums = {
        key: sum(int(_summary(s).get(key) or 0) for s in steps)
        for key in (
            "tokens_reused",
            "tokens_computed",
            "generated_tokens",
            "cache_hits",
            "cache_misses",
            "bytes_copied",
        )
    }
    meta = (
        f"{len(steps)} step(s) · {sums['tokens_reused']} tokens reused · "
        f"{sums['tokens_computed']} computed · {sums['generated_tokens']} generated · "
        f"cache {sums['cache_hits']} hits / {sums['cache_misses']} misses · "
        f"{_bytes(sums['bytes_copied'])} copied"
    )
    heads = (
        "step",
        "session",
        "prompt",
        "reused",
        "computed",
        "generated",
        "retrievals",
        "hits",
        "misses",
        "hit rate",
        "bytes copied",
        "blocks",
        "seconds",
        "most recalled message",
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{_e(title)}</h1>
<div class="meta">{_e(meta)}</div>
<img id="heatmap" alt="heat map: agent step by history token position"
 src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">
<div class="meta">Rows: agent steps. Columns: token positions of the history. Colour: how
often the memory blocks covering a position were selected (all layers, all chunks). Grey:
beyond that step's context. Dotted lines: message starts in the last step.</div>
{_marker_list(markers)}
<h2>Messages behind the hottest blocks</h2>
<table class="sortable" id="hot-blocks"><thead><tr><th>tokens</th><th>selections</th>
<th>steps</th><th>message(s)</th><th>block text</th></tr></thead>
<tbody>
{_hot_rows(hot)}
</tbody></table>
<h2>Per-step cost</h2>
<table class="sortable" id="steps"><thead><tr>{"".join(f"<th>{_e(h)}</th>" for h in heads)}
</tr></thead><tbody>
{_step_rows(steps)}
</tbody></table>
<h2>Recalled messages per step</h2>
{_recalled_details(steps)}
<script type="application/json" id="trace-data">{_embedded_json(steps)}</script>
<script>{_JS}</script>
</body></html>
"""
    out.write_text(page, encoding="utf-8")
    return out
