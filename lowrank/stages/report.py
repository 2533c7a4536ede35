"""Reports: ``report.json`` (versioned), ``report.md`` (fits a pull-request comment) and a
self-contained ``report.html`` with plots, written into every output directory.

``report.json`` sections: ``params``/``bytes`` before and after, ``layers`` (shape, rank,
parameters before/after, method, energy kept, relative error, or why it stayed dense),
``stages`` (timings, cache hits), ``versions``, and when those stages ran: ``recovery`` (loss
before/after), ``fidelity`` (held-out comparison with the dense model, int8 included),
``export`` (ONNX validation, factor check, size), ``int8`` (size, settings), ``latency`` (dense vs
compressed ONNX, p50/p90/p99, QPS, machine) and ``gate`` (one result per goal).
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from pathlib import Path

from rich.filesize import decimal

from ..errors import InputError
from ..io.checkpoint import Checkpoint
from ..io.files import check_format, read_json_file, write_json
from ..naming import module_name
from .evaluate import describe_tensor_scores
from .gate import METRICS

REPORT_FORMAT, REPORT_VERSION = "lowrank.report", 1


def final_model(artifacts: dict):
    """The LowRankCheckpoint a run ends with: recovered when recovery ran, else factored."""
    return artifacts.get("recover") or artifacts.get("factorize")


def build_report(ckpt: Checkpoint, artifacts: dict, manifest: dict, written: Path,
                 output: Path) -> dict:
    """The report of a run whose files were written to ``written`` (final path ``output``)."""
    model = final_model(artifacts)
    before = ckpt.num_params()
    after = model.params_after if model else before
    model_files = list(written.glob("model*.safetensors"))  # one file, or shards
    report = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "input": str(ckpt.path),
        "output": str(output),
        "params": {"before": before, "after": after, "ratio": round(after / before, 6)},
        "bytes": {"before": ckpt.num_bytes(),
                  "after": sum(f.stat().st_size for f in model_files) if model_files else None},
        "layers": {n: r.to_json() for n, r in model.layers.items()} if model else {},
        "stages": [{k: st[k] for k in ("stage", "cached", "seconds")} for st in manifest["stages"]],
        "versions": manifest["versions"],
    }
    if model is not None and "recovery" in model.metadata:
        report["recovery"] = model.metadata["recovery"]
    if "evaluate" in artifacts:
        report["fidelity"] = artifacts["evaluate"]
    for name, entry in report["layers"].items():
        numel = math.prod(entry["shape"])
        rows = entry["shape"][0]
        entry["params_before"] = numel
        entry["params_after"] = (numel if entry["rank"] is None
                                 else entry["rank"] * (rows + numel // rows))
    if "export" in artifacts:
        report["export"] = {"path": str(output / "onnx" / "model.onnx"), **artifacts["export"].result}
    if "optimize" in artifacts:
        report["optimize"] = {"path": str(output / "onnx-optimized" / "model.onnx"),
                              **artifacts["optimize"].result}
        check = getattr(artifacts.get("plan"), "policy", {}).get("fusion_check")
        if check:  # why attention is (not) fused: lowrank.stages.fusion
            report["optimize"]["fusion_check"] = check
    if "int8" in artifacts:
        report["int8"] = {"path": str(output / "onnx-int8" / "model.onnx"), **artifacts["int8"].result}
    if "bench" in artifacts:
        report["latency"] = artifacts["bench"]
    return report


def read_report(path: Path) -> dict:
    report = read_json_file(path, "report")
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
        raise InputError(f"{path}: not a lowrank report (no \"format\": \"{REPORT_FORMAT}\")")
    return check_format(report, REPORT_FORMAT, REPORT_VERSION, path)


def describe(result: dict) -> str:
    """One line per check, e.g. ``PASS cosine 0.9512 >= 0.95 (threshold; dense 1)``."""
    if result["passed"] is None:
        return f"SKIP {result['metric']}: not measured"
    higher = METRICS[result["metric"]][0]
    relation = {"threshold": ">=" if higher else "<=", "min-improvement": "improves by >=",
                "max-degradation": "degrades by <=", "percent-min-improvement": "improves by >= %",
                "percent-max-degradation": "degrades by <= %"}[result["type"]]
    verdict = "PASS" if result["passed"] else "FAIL"
    return (f"{verdict} {result['metric']} {result['value']:.6g} ({relation} {result['goal']:g}; "
            f"dense {result['baseline']:.6g})")


# --------------------------------------------------------------------------------------------
# Rendering


def _fmt_bytes(n: int | None) -> str:
    return "-" if n is None else decimal(n)


def summary_rows(report: dict) -> list[tuple[str, str]]:
    """(what, value) pairs: the headline of report.md and report.html."""
    p, b = report["params"], report["bytes"]
    rows = [("parameters", f"{p['before']:,} → {p['after']:,} ({p['ratio']:.1%})"),
            ("checkpoint size", f"{_fmt_bytes(b['before'])} → {_fmt_bytes(b['after'])}")]
    f = report.get("fidelity")
    if f and f["kind"] == "encoder":
        rows.append(("fidelity (held-out)", f"cosine {f['cosine']:.4f} (min {f['cosine_min']:.3f}), "
                     f"kNN@{f['k']} {f['knn%d_overlap' % f['k']]:.3f} on {f['samples']} texts"))
        if "int8" in f:
            g = f["int8"]
            rows.append(("int8 fidelity", f"cosine {g['cosine']:.4f}, kNN@{g['k']} "
                         f"{g['knn%d_overlap' % g['k']]:.3f}"))
    elif f and f["kind"] in ("classifier", "outputs"):  # tensor inputs (lowrank.evaluate)
        rows.append(("fidelity (held-out)", describe_tensor_scores(f)))
    elif f:
        rows.append(("perplexity (held-out)", f"{f['perplexity_dense']:.3f} → {f['perplexity']:.3f}"))
        if "int8" in f:  # a decoder's int8 export against the fp32 compressed model
            g = f["int8"]
            greedy = (f", greedy match {g['greedy_match_lengths']} of {g['greedy_tokens']} tokens"
                      if "greedy_match_lengths" in g else "")
            rows.append(("int8 fidelity", f"top-1 agreement {g['top1_agreement']:.2%} on "
                         f"{g['tokens']} tokens{greedy}"))
    if "recovery" in report:
        r = report["recovery"]
        blocks = f"{r['block_steps']} block steps + " if r.get("block_steps") else ""
        speed = f", {r['tokens_per_second']:.0f} tokens/s" if r.get("tokens_per_second") else ""
        rows.append(("recovery", (f"{r['method']} {r.get('mode', 'end-to-end')}, {blocks}"
                                  f"{r.get('steps', r['settings']['steps'])} steps in "
                                  f"{r['seconds']:.0f} s{speed}: held-out loss "
                                  f"{r['heldout_loss_before']:.4f} → {r['heldout_loss_after']:.4f}"
                                  + (" (worse: discarded)" if r.get("discarded") else ""))))
    if "export" in report:
        e = report["export"]
        worst = max(e["validation"], key=lambda v: v["rel_error"])
        lm = (f", top-1 agreement {min(v['top1_agreement'] for v in e['validation']):.2%}, max "
              f"|Δ log-prob| {max(v['max_logprob_diff'] for v in e['validation']):.2e}"
              if "top1_agreement" in worst else "")
        gen = e.get("generation") or []
        cache = (f"; KV cache: greedy equal to PyTorch's for {gen[0]['tokens']} tokens on "
                 f"{sum(g['match_length'] == g['tokens'] for g in gen)} of {len(gen)} prompts"
                 if gen else "")
        rows.append(("ONNX", f"{_fmt_bytes(e['bytes'])}, validated on {len(e['validation'])} "
                     f"inputs, max abs diff {worst['max_abs_diff']:.2e} "
                     f"({worst['rel_error']:.1e} × RMS){lm}{cache}"))
    if "optimize" in report:
        o = report["optimize"]
        check = o.get("fusion_check")
        loss = (check or {}).get("probe_loss")
        why = (f" (fusion check, {check['precision']}: attention kept "
               f"{'dense and fused' if check['kept_dense'] else 'factored'}; fused/factored "
               f"time {check['fused_over_factored']:.3f}"
               + (f", probe loss {loss['fused']:.4f}/{loss['factored']:.4f}" if loss else "")
               + ")" if check else "")
        rows.append(("ONNX optimized", (", ".join(f"{n} {op}" for op, n in o["fused"].items())
                                        or "nothing fused") + why))
    for pair in report.get("latency", {}).get("pairs", []):
        if pair["baseline"] != "dense":  # plain speedups are in the latency table
            rows.append((f"{pair['model']} vs {pair['baseline']}",
                         f"{pair['speedup']:.2f}× at {_point(pair)}"))
    if "int8" in report and "export" in report:
        rows.append(("ONNX int8", f"{_fmt_bytes(report['int8']['bytes'])} "
                     f"({report['int8']['bytes'] / report['export']['bytes']:.1%} of fp32)"))
    return rows


def latency_rows(report: dict) -> list[list[str]]:
    lat = report.get("latency")
    if not lat:
        return []
    rows = []
    for r in lat["results"]:
        speed = next(p for p in lat["speedup"] if p["batch"] == r["batch"]
                     and p["sequence"] == r["sequence"] and p.get("phase") == r.get("phase"))
        speed = speed[r["model"]]
        rows.append([r["model"], _point(r), f"{r['p50_ms']:.2f}",
                     f"{r['p90_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['qps']:.1f}", f"{speed:.2f}×"])
    return rows


def _point(r: dict) -> str:
    """batch×sequence, and for a decoder's phases what was timed: the prompt, or one token."""
    point = f"{r['batch']}×{r['sequence']}"
    phase = r.get("phase")
    return point if phase is None else (f"{point} prefill" if phase == "prefill"
                                        else f"{r['batch']}×1 decode (past {r['sequence']})")


LATENCY_HEAD = ["model", "batch×seq", "p50 ms", "p90 ms", "p99 ms", "QPS", "vs dense"]


def render_markdown(report: dict) -> str:
    lines = [f"## lowrank report: `{Path(report['input']).name}`", "",
             "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary_rows(report)]
    if report.get("gate"):
        lines += ["", "**Gate**", ""] + [f"- {describe(r)}" for r in report["gate"]]
    if report.get("latency"):
        m = report["latency"]["machine"]
        lines += ["", f"**Latency** (onnxruntime {m['onnxruntime']}, {m['cpu']}, "
                  f"{report['latency']['settings']['intra_threads']} threads)", "",
                  "| " + " | ".join(LATENCY_HEAD) + " |", "|---|---|---:|---:|---:|---:|---:|"]
        lines += ["| " + " | ".join(r) + " |" for r in latency_rows(report)]
    factored = {n: e for n, e in report["layers"].items() if e["rank"] is not None}
    dense = {n: e for n, e in report["layers"].items() if e["rank"] is None}
    lines += ["", f"<details><summary>{len(factored)} factored layers, {len(dense)} kept dense"
              f"</summary>", "", "| layer | shape | rank | params | energy | rel. error |",
              "|---|---|---:|---:|---:|---:|"]
    for n, e in factored.items():
        lines.append(f"| `{n}` | {'×'.join(map(str, e['shape']))} | {e['rank']} | "
                     f"{e['params_before']:,} → {e['params_after']:,} | {e['energy']:.3f} | "
                     f"{e['rel_error']:.3f} |")
    for n, e in dense.items():
        lines.append(f"| `{n}` | {'×'.join(map(str, e['shape']))} | dense | "
                     f"{e['params_before']:,} | | {e.get('reason', '')} |")
    lines += ["", "</details>", ""]
    return "\n".join(lines)


def _figure_png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


BLOCK_MATRIX = re.compile(r"^(.*?)\.(\d+)\.(.+)$")  # "<stack>.<block number>.<path inside>"


def block_grid(layers: dict) -> tuple[list[str], int, list[list[float]], dict[str, float]]:
    """The share of parameters each matrix keeps (after / before), laid out by block: (row
    labels: a matrix's path inside its block, with the stack's name when there are several;
    block count; shares[row][block], NaN where a block has no such matrix; {name: share} of
    the matrices outside numbered blocks)."""
    cells, others = {}, {}
    for name, e in layers.items():
        share = e["params_after"] / e["params_before"] if e["params_before"] else 1.0
        match = BLOCK_MATRIX.match(module_name(name))
        if match:
            cells[(match[1], match[3]), int(match[2])] = share
        else:
            others[module_name(name)] = share
    stacks = {stack for (stack, _), _ in cells}
    rows = list(dict.fromkeys(key for key, _ in cells))
    count = max((block for _, block in cells), default=-1) + 1
    grid = [[cells.get((key, block), math.nan) for block in range(count)] for key in rows]
    labels = [f"{stack}: {path}" if len(stacks) > 1 else path for stack, path in rows]
    return labels, count, grid, others


def params_figure(layers: dict, plt):
    """Parameters kept per matrix: a block × matrix grid (one small figure at any depth), the
    matrices outside the blocks as bars beside it; one bar per matrix when there are no
    numbered blocks."""
    labels, count, grid, others = block_grid(layers)
    if count < 2:
        names = list(layers)
        fig, ax = plt.subplots(figsize=(8, max(3, 0.18 * len(names))))
        ys = range(len(names))
        ax.barh(ys, [layers[n]["params_before"] for n in names], color="#bbb", label="before")
        ax.barh(ys, [layers[n]["params_after"] for n in names], color="#2a7", label="after")
        ax.set_yticks(list(ys), [module_name(n) for n in names], fontsize=6)
        ax.invert_yaxis()
        ax.set(xlabel="parameters", title="Parameters per layer")
        ax.legend()
        return fig
    height = max(2.6, 0.28 * max(len(labels), len(others)) + 1.4)
    fig, axes = plt.subplots(1, 2 if others else 1, figsize=(10, height), squeeze=False,
                             layout="constrained",
                             gridspec_kw={"width_ratios": [4, 1] if others else [1]})
    ax = axes[0][0]
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1,
                      interpolation="nearest")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xticks(range(0, count, max(1, math.ceil(count / 30))))
    ax.tick_params(axis="x", labelsize=7)
    ax.set(xlabel="block", title="Share of parameters kept (1 = dense)")
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.04)
    if others:
        names, ax = list(others), axes[0][1]
        ax.barh(range(len(names)), [others[n] for n in names],
                color=[image.cmap(image.norm(others[n])) for n in names])
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set(xlim=(0, 1), title="outside the blocks")
        ax.invert_yaxis()
        ax.tick_params(axis="x", labelsize=7)
    return fig


def plots(report: dict, spectra=None) -> dict[str, str]:
    """Base64 PNGs: energy curves with the chosen ranks, parameters kept (:func:`params_figure`),
    latency bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    factored = {n: e for n, e in report["layers"].items() if e["rank"] is not None}
    if spectra is not None and factored:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name, e in factored.items():
            s = spectra.matrices.get(name)
            if s is None:
                continue
            curve = s.energy_curve()
            line, = ax.plot(range(1, len(curve) + 1), curve, lw=0.8, alpha=0.7)
            r = min(e["rank"], len(curve))
            ax.plot([r], [curve[r - 1]], "o", ms=3, color=line.get_color())
        ax.set_xscale("log")
        ax.set(xlabel="rank", ylabel="energy kept", title="Energy curves, chosen rank marked")
        out["energy"] = _figure_png(fig)
    out["params"] = _figure_png(params_figure(report["layers"], plt))
    if report.get("latency"):
        results = report["latency"]["results"]
        points = list(dict.fromkeys(_point(r) for r in results))
        models = list(dict.fromkeys(r["model"] for r in results))
        fig, axes = plt.subplots(1, len(points), figsize=(3.2 * len(points), 3.2), squeeze=False)
        for ax, point in zip(axes[0], points):
            vals = [next(r["p50_ms"] for r in results if r["model"] == m and _point(r) == point)
                    for m in models]
            ax.bar(range(len(models)), vals, color=["#999", "#2a7", "#777", "#186"][:len(models)])
            ax.set_xticks(range(len(models)), models, rotation=30, fontsize=7)
            ax.set_title(point, fontsize=9)
            ax.set_ylabel("p50 ms", fontsize=8)
        fig.suptitle("Latency (onnxruntime CPU)")
        out["latency"] = _figure_png(fig)
    return out


def render_html(report: dict, spectra=None) -> str:
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>lowrank report</title>",
             "<style>body{font:14px system-ui,sans-serif;max-width:960px;margin:2em auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:3px 8px}"
             "td.n{text-align:right}.pass{color:#070}.fail{color:#b00}</style></head><body>",
             f"<h1>lowrank report: {e(Path(report['input']).name)}</h1><table>"]
    parts += [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in summary_rows(report)]
    parts.append("</table>")
    if report.get("gate"):
        parts.append("<h2>Gate</h2><ul>")
        parts += [f"<li class='{'pass' if r['passed'] else 'fail'}'>{e(describe(r))}</li>"
                  for r in report["gate"]]
        parts.append("</ul>")
    images = plots(report, spectra)
    if report.get("latency"):
        parts.append("<h2>Latency</h2><table><tr>" + "".join(f"<th>{h}</th>" for h in LATENCY_HEAD)
                     + "</tr>")
        parts += ["<tr>" + "".join(f"<td class='n'>{e(c)}</td>" for c in row) + "</tr>"
                  for row in latency_rows(report)]
        parts.append("</table>")
    for key, title in (("latency", ""), ("energy", "Spectra"), ("params", "Parameters")):
        if key in images:
            if title:
                parts.append(f"<h2>{title}</h2>")
            parts.append(f"<img alt='{key}' src='data:image/png;base64,{images[key]}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(report: dict, artifacts: dict, directory: Path) -> None:
    """report.json, report.md and report.html into ``directory``."""
    write_json(directory / "report.json", report)
    (directory / "report.md").write_text(render_markdown(report))
    (directory / "report.html").write_text(render_html(report, artifacts.get("analyze")))
