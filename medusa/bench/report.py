"""Turn measured runs into the result documents: the summary figures per mode (medians,
means, speedups as ratios of medians measured in the same run, the golden check), the JSON
file, a markdown table and a PNG plot. Knows nothing of how the runs were measured."""
from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from medusa.bench.decode import Mode, Run


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(float(x), nd)


def prompt_record(pid: str, prompt_tokens: int, row: dict[str, Run], ar_label: str | None) -> dict[str, Any]:
    """Per-prompt figures of every mode; matches_ar: the mode's greedy tokens equal ar's
    (the golden check), None for ar itself or when ar did not run."""
    ar = row.get(ar_label) if ar_label else None
    modes = {}
    for label, run in row.items():
        modes[label] = {
            "new_tokens": run.new_tokens,
            "seconds": _r(run.seconds),
            "tokens_per_s": _r(run.tokens_per_s, 3),
            "ttft_s": _r(run.ttft_s),
            "steps": run.steps,
            "mean_accepted": _r(run.mean_accepted),
            "accepted_hist": {str(k): v for k, v in sorted(Counter(run.step_tokens).items())},
            "finish_reason": run.finish_reason,
            "matches_ar": None if ar is None or label == ar_label else run.tokens == ar.tokens,
        }
    return {"id": pid, "prompt_tokens": prompt_tokens, "modes": modes}


def _ratio(a: float | None, b: float | None) -> float | None:
    return _r(a / b, 3) if a is not None and b else None


def summarise(modes: list[Mode], results: list[dict[str, Run]]) -> dict[str, dict[str, Any]]:
    """Summary figures per mode label, in the order the modes ran."""
    ar = next((m.label for m in modes if m.spec.kind == "ar"), None)
    hf = next((m.label for m in modes if m.spec.kind == "hf"), None)
    out: dict[str, dict[str, Any]] = {}
    for m in modes:
        runs = [row[m.label] for row in results]
        tps = [r.tokens_per_s for r in runs]
        steps = [n for r in runs for n in r.step_tokens]
        hist = Counter(steps)
        out[m.label] = {
            "kind": m.spec.kind,
            "heads": m.heads_label,
            "tree": m.tree.name if m.tree is not None else None,
            "tree_nodes": m.tree.num_nodes if m.tree is not None else None,
            "note": m.note,
            "prompts": len(runs),
            "new_tokens": sum(r.new_tokens for r in runs),
            "seconds": _r(sum(r.seconds for r in runs), 3),
            "tokens_per_s_median": _r(statistics.median(tps), 3) if tps else None,
            "tokens_per_s_mean": _r(statistics.fmean(tps), 3) if tps else None,
            "mean_accepted": _r(sum(steps) / len(steps)) if steps else None,
            "ttft_s_median": _r(statistics.median(r.ttft_s for r in runs)) if runs else None,
            "ttft_s_mean": _r(statistics.fmean(r.ttft_s for r in runs)) if runs else None,
            "accepted_hist": {str(k): hist[k] for k in sorted(hist)},
        }
    for label, s in out.items():
        s["speedup_vs_ar"] = _ratio(s["tokens_per_s_median"], out[ar]["tokens_per_s_median"]) if ar else None
        s["speedup_vs_hf"] = _ratio(s["tokens_per_s_median"], out[hf]["tokens_per_s_median"]) if hf else None
        if ar and label != ar:
            s["matches_ar_all"] = all(row[label].tokens == row[ar].tokens for row in results)
            s["matches_ar_count"] = sum(row[label].tokens == row[ar].tokens for row in results)
        else:
            s["matches_ar_all"] = s["matches_ar_count"] = None
    return out


# ------------------------------------------------------------------ files

def write_json(doc: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def _fmt(x, spec: str = ".2f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def _times(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def header_lines(doc: dict[str, Any]) -> list[str]:
    commit = doc.get("commit", "unknown")
    short = commit[:10] + ("+dirty" if doc.get("dirty") else "")
    return [f"Device: {doc['device']} ({doc.get('device_detail', '')}); date {doc['date']}; commit {short}; "
            f"torch {doc.get('torch')}, transformers {doc.get('transformers')}; load average at start / end "
            f"{_load(doc.get('load_average'))} / {_load(doc.get('load_average_end'))}."]


def _load(x) -> str:
    return "-" if not x else f"{x[0]:.1f}"


def decode_markdown(doc: dict[str, Any]) -> str:
    K = doc.get("beams", 1)
    decoding = "greedy" if K <= 1 else f"beam search with {K} beams (tokens/s and output: the best beam's)"
    lines = [f"### {doc['dataset']} on {doc['device']}", ""]
    lines += header_lines(doc)
    lines += ["", f"Model {doc['model']}, dtype {doc['dtype']}, {doc['num_prompts']} prompts x up to "
              f"{doc['max_new_tokens']} new tokens, batch 1, {decoding}, "
              f"{doc['warmup']} warm-up prompt(s) excluded, "
              f"CUDA graphs: {'on' if doc.get('graphs') else 'off'}{' + torch.compile' if doc.get('compile') else ''}.", ""]
    lines.append("| mode | heads | tree (nodes) | tokens/s median | tokens/s mean | accepted/step | TTFT median (s) "
                 "| vs ar | vs hf | output == ar |")
    lines.append("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    for label, s in doc["modes"].items():
        tree = f"{s['tree']} ({s['tree_nodes']})" if s["tree"] else "-"
        golden = "-" if s["matches_ar_all"] is None else f"{s['matches_ar_count']}/{s['prompts']}"
        lines.append(f"| {label} | {s['heads'] or '-'} | {tree} | {_fmt(s['tokens_per_s_median'])} | "
                     f"{_fmt(s['tokens_per_s_mean'])} | {_fmt(s['mean_accepted'])} | {_fmt(s['ttft_s_median'], '.3f')} | "
                     f"{_times(s['speedup_vs_ar'])} | {_times(s['speedup_vs_hf'])} | {golden} |")
    for label, reason in doc.get("skipped", {}).items():
        lines.append(f"| {label} | skipped: {reason} | | | | | | | | |")
    notes = [f"- {label}: {s['note']}" for label, s in doc["modes"].items() if s.get("note")]
    notes += [f"- {n}" for n in doc.get("notes", [])]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def decode_plot(doc: dict[str, Any], path: Path) -> Path | None:
    """Tokens/s per mode (median bar, one dot per prompt) and, for spec modes, the histogram
    of tokens produced per step. Returns None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels = list(doc["modes"])
    spec = [lab for lab in labels if doc["modes"][lab]["kind"] == "spec"]
    fig, axes = plt.subplots(1, 2 if spec else 1, figsize=(11 if spec else 6, 4), squeeze=False)
    ax = axes[0][0]
    med = [doc["modes"][lab]["tokens_per_s_median"] or 0 for lab in labels]
    ax.bar(range(len(labels)), med, color="#8fb3d9")
    for i, lab in enumerate(labels):
        pts = [p["modes"][lab]["tokens_per_s"] for p in doc["prompts"] if lab in p["modes"]]
        ax.scatter([i] * len(pts), pts, s=10, color="#1f4e79", zorder=3)
    ax.set_xticks(range(len(labels)), labels, rotation=20)
    ax.set_ylabel("new tokens / s (bar: median, dots: prompts)")
    ax.set_title(f"{doc['dataset']} - {doc['device']} - {doc['dtype']}")
    if spec:
        ax = axes[0][1]
        width = 0.8 / len(spec)
        for j, lab in enumerate(spec):
            hist = {int(k): v for k, v in doc["modes"][lab]["accepted_hist"].items()}
            total = sum(hist.values()) or 1
            xs = sorted(hist)
            ax.bar([x + (j - (len(spec) - 1) / 2) * width for x in xs], [hist[x] / total for x in xs], width, label=lab)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("tokens produced per step (accepted + bonus)")
        ax.set_ylabel("fraction of steps")
        ax.set_title("accepted length per step")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
