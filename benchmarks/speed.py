"""Each compress stage's time as a ratio to this machine's limit for the same work (issue 13).

For every model, `lowrank compress MODEL OUT FLAGS --no-cache` runs in its own process (stage
seconds from OUT/manifest.json, whole wall time around the process); then, in this process and
right after (so both see the same machine load), the limits:

- analyze: the Gram matrix (float64, the smaller side) plus float64 `eigvalsh` of every matrix
  the stage analyzes (`lowrank.linalg.gram_svdvals` on the plain matrix). With calibration the
  stage's work is the weighted one: each input Gram's root (Cholesky), each weighted matrix
  W·L (for a Linear with fewer outputs than inputs, the root of its output Gram), its Gram
  and its `eigh` (eigenvalues for the spectrum, eigenvectors that the scores
  stage and factorization then reuse instead of solving again), timed the same way;
- calibrate: plain `torch.inference_mode` forward passes of the dense model over the same
  batches (calibration lines, max_length, batch size as the stage's defaults, lines batched
  by token count as the stage does; a causal LM's lines sampled to top them up included),
  without the LM head's logits, which no statistic needs and the stage skips too
  (`lowrank.models.skip_output_head`; the same passes with the head are in the JSON as
  "forward passes with the LM head"); plus, for that top-up, transformers' `generate` of the
  same sequences (`sampling_limit`, "top-up sampling" in the JSON). The limit's passes are float32;
  the stage's autocast to bf16 where the CPU has it (`calibrate.forward_dtype`), so it can
  come in under its limit;
- factorize: the truncated SVDs the plan needs, each matrix at its planned rank with the solver
  factorize picks (`truncated_svd`, plain matrix; weighting costs one GEMM more). With
  calibration, compensation (the default) also needs the dense model's block outputs and the
  compressed model's block inputs over the lines it fits on (with a top-up, half the file's
  and every sampled one: `factorize.compensate_lines`): plus two float32 passes over those
  (compensation's passes run in bf16 where the CPU has it, so this stage can come in under
  its limit);
- scores: forward + backward passes (weight gradients included) over the probe batches with the
  stage's sampled objective, no hooks; plus the forward passes that measure the input
  embedding's largest candidate (a reference pass and one for the candidate, over the probe
  lines batched by length as the stage does; float32, where the stage autocasts to bf16 where
  the CPU has it, `scores.measure_dtype`). The embedding's other candidates are measured by
  the plan stage, and only when its plan could factor the embedding (MiniLM at 50%, not
  SmolLM2 at 85%); the plan stage has no limit here.

Limits use torch's default thread count here; stages run per-matrix work one thread per
matrix (lowrank.parallel.fixed_threads), as many matrices at a time as compress's --workers
(default auto: one thread per core; the sharded checkpoint also with each --sharded-workers
value, e.g. 1 for serial). The machine is shared: ratios measured in the same run are the
meaningful numbers, absolute seconds are noisy.

    python benchmarks/speed.py [--models minilm smollm2 sharded] [--repeats 3]
        [--sharded-workers auto 1 2] [--out reports/speed]

The sharded checkpoint (24 fp32 matrices 2048×8192, 1.6 GB) is generated under /tmp by
benchmarks/memory.py's generator.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from calibration_text import calibration_file  # a module beside this script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
CALIB = str(calibration_file())
SHARDED = Path(tempfile.gettempdir()) / "lowrank-speed-sharded"
MODELS = {  # name: (model argument, compress flags, compress runs)
    "minilm": ("minilm", ["--param-ratio", "0.5", "--calibration", CALIB], 3),
    "smollm2": ("/root/.cache/smollm2-135m", ["--param-ratio", "0.85", "--calibration", CALIB], 3),
    "sharded": (str(SHARDED), ["--param-ratio", "0.5"], 1),
}
# The limits made of whole passes over the data (calibrate, scores): the median of this many
# timings (one run of them moved by 20% between benchmark runs); per-matrix limits are sums.
PASS_REPEATS = 3
OLD_SHARDED_SERIAL_S = 573.7  # reports/memory-sharded.md, before issue 13


def compress(model: str, flags: list[str], keep: Path | None = None) -> dict:
    """One compress in its own process: wall seconds, stage seconds, the plan's ranks (plan.json
    copied to ``keep`` when given)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-c", "from lowrank.cli import main; main()", "compress", model,
               f"{tmp}/out", *flags, "--no-cache"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True,
                              env=dict(os.environ, HF_HUB_OFFLINE="1"))
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
        manifest = json.loads(Path(f"{tmp}/out/manifest.json").read_text())
        plan = json.loads(Path(f"{tmp}/out/plan.json").read_text())
        if keep is not None:
            keep.write_text(json.dumps(plan))
    stages = {r["stage"]: r["seconds"] for r in manifest["stages"]}
    ranks = {n: e["rank"] for n, e in plan["layers"].items() if e.get("rank") is not None}
    return {"wall": wall, "stages": stages, "ranks": ranks}


def _timed(fn, repeats: int = 1) -> float:
    """Seconds of ``fn()``: the median of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def analyze_limit(ckpt) -> float:
    from lowrank.linalg import gram_svdvals, matrix_view
    from lowrank.stages.analyze import matrix_infos

    return sum(_timed(lambda n=i.name: gram_svdvals(matrix_view(ckpt.get(n))))
               for i in matrix_infos(ckpt))


def weighted_analyze_limit(ckpt, stats) -> float:
    from lowrank.linalg import gram_eigh, matrix_view
    from lowrank.stages.analyze import matrix_infos
    from lowrank.stages.calibrate import _digest
    from lowrank.weighting import psd_root, weighted

    # Layers fed the same input (query, key, value) share one root: found untimed, by content
    same_input = {name: _digest(gram) for name, gram in stats.grams.items()}
    roots = {}

    def one(name: str) -> None:
        w = matrix_view(ckpt.get(name), name in stats.transposed).double()
        gram = stats.grams.get(name)
        if gram is not None and gram.shape[0] == w.shape[1]:
            if same_input[name] not in roots:
                roots[same_input[name]] = psd_root(gram)
            w = w @ roots[same_input[name]]
        elif name in stats.output_grams:  # the weighted matrix: a root of W·G·Wᵀ
            w = psd_root(stats.output_grams[name])
        elif name in stats.token_counts:
            w = weighted(w, stats.weighting(name, w.shape[1]))
        gram_eigh(w.T if w.shape[0] > w.shape[1] else w)

    return sum(_timed(lambda n=i.name: one(n)) for i in matrix_infos(ckpt))


def factorize_limit(ckpt, ranks: dict[str, int]) -> float:
    from lowrank.linalg import layer_seed, matrix_view, truncated_svd
    from lowrank.stages.factorize import FactorizeSettings, choose_method

    s, total = FactorizeSettings(), 0.0
    for name, rank in ranks.items():
        w = matrix_view(ckpt.get(name))
        method = choose_method(*w.shape, s)
        seed = layer_seed(s.seed, name)
        total += _timed(lambda w=w, r=rank, m=method, seed=seed:
                        truncated_svd(w, r, m, seed, s.oversample, s.niter))
    return total


def calibrate_limit(ckpt, sampled: list[str], head: bool = False,
                    file_share: float = 1.0) -> float:
    from lowrank.io.samples import model_batches
    from lowrank.models import Models, skip_output_head
    from lowrank.stages.calibrate import CalibrateSettings
    from lowrank.stages.calibration_text import calibration_data

    s = CalibrateSettings(calibration_file=CALIB)
    model, tokenizer, data = calibration_data(Models(ckpt), s, warn=False, sampled=sampled,
                                              file_share=file_share)
    batches = list(model_batches(data, tokenizer, s.batch_size, s.max_length, by_length=True))

    def run():
        with torch.inference_mode(), skip_output_head(model, skip=not head):
            for inputs, _ in batches:
                model(**inputs)
    return _timed(run, PASS_REPEATS)


def sampling_limit(ckpt) -> float:
    """transformers' `generate` (float32, its own sampler) of the sequences the calibration's
    top-up samples (as many, as long, from the same start token): what sampling them costs
    without lowrank."""
    from lowrank.io.samples import token_count
    from lowrank.models import Models
    from lowrank.sample_text import start_token
    from lowrank.stages.calibrate import CalibrateSettings
    from lowrank.stages.calibration_text import calibration_data, top_up_sampling

    s = CalibrateSettings(calibration_file=CALIB)
    model, tokenizer, data = calibration_data(Models(ckpt), s, warn=False)
    sampling = top_up_sampling(s, s.tokens - token_count(data, tokenizer, s.max_length))
    ids = torch.full((sampling.rows, 1), start_token(tokenizer, model.config))
    torch.manual_seed(0)

    def run():
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                           temperature=1.0, top_k=0, top_p=1.0,
                           max_new_tokens=sampling.length, min_new_tokens=1,
                           pad_token_id=tokenizer.eos_token_id)
    return _timed(run)


def scores_limit(ckpt) -> float:
    from lowrank.stages.probe import probe_data
    from lowrank.stages.scores import ScoreSettings, _objective

    s = ScoreSettings()
    stats = SimpleNamespace(settings=SimpleNamespace(calibration_file=CALIB))
    model, batches, length_batches, kind = probe_data(ckpt, s, stats)
    gen = torch.Generator().manual_seed(s.seed)

    measured = 2  # the input embedding's largest candidate: the reference pass, then its own

    def run():
        for inputs, mask in batches:
            out = model(**inputs, output_hidden_states=kind == "hidden")
            _objective(out, mask, kind, gen)[0].backward()
        with torch.inference_mode():
            for _ in range(measured if s.measure_embedding else 0):
                for inputs, _ in length_batches:
                    model(**inputs, output_hidden_states=kind == "hidden")
    return _timed(run, PASS_REPEATS)


def measure(name: str, repeats: int, workers: list[int], keep: Path | None) -> dict:
    from lowrank.cli.console import resolve_model
    from lowrank.io.checkpoint import open_checkpoint

    model, flags, runs = MODELS[name]
    runs = min(runs, repeats)
    result = {"command": f"lowrank compress {model} OUT {' '.join(flags)} --no-cache",
              "runs": {}}
    for n in workers if name == "sharded" else ["auto"]:
        extra = ["--workers", str(n)] if n != "auto" else []
        plan = keep / f"plan-{name}-{n}.json" if keep else None
        done = [compress(model, flags + extra, plan) for _ in range(runs)]
        print(name, n, [round(d["wall"], 1) for d in done], flush=True)
        result["runs"][str(n)] = {
            "wall": statistics.median(d["wall"] for d in done),
            "stages": {k: statistics.median(d["stages"][k] for d in done)
                       for k in done[0]["stages"]},
            "all_walls": [d["wall"] for d in done]}
        ranks = done[0]["ranks"]
    ckpt = open_checkpoint(resolve_model(model))
    limits = {"analyze": analyze_limit(ckpt), "factorize": factorize_limit(ckpt, ranks)}
    if "--calibration" in flags:
        from lowrank.stages.calibrate import CalibrateSettings, calibrate

        stats = calibrate(ckpt, CalibrateSettings(calibration_file=CALIB))  # not timed
        sampled = stats.sampled_lines  # a causal LM's top-up: the stage samples it again
        limits["analyze"] = weighted_analyze_limit(ckpt, stats)
        passes = calibrate_limit(ckpt, sampled)
        limits["top-up sampling"] = sampling_limit(ckpt) if sampled else 0.0
        limits["calibrate"] = passes + limits["top-up sampling"]
        limits["forward passes with the LM head"] = calibrate_limit(ckpt, sampled, head=True)
        limits["scores"] = scores_limit(ckpt)
        if "--no-compensate" not in flags:  # compensation reruns its share of the lines
            from lowrank.stages.factorize import FactorizeSettings

            lines = FactorizeSettings().compensation(stats)[2]
            limits["factorize"] += 2 * (passes if lines >= 1 else
                                        calibrate_limit(ckpt, sampled, file_share=lines))
    result["limits"] = limits
    print(name, "limits", {k: round(v, 1) for k, v in limits.items()}, flush=True)
    return result


def write_report(results: dict, out: Path, threads: int) -> None:
    lines = ["# Stage times against the machine's limit (issue 13)", "",
             (f"`python benchmarks/speed.py` ({datetime.date.today()}, {platform.machine()}, "
              f"{os.cpu_count()} cores shared with other jobs, torch {torch.__version__}, "
              f"limits with {threads} threads). Ratio = stage seconds / limit seconds (see the "
              "script's docstring for each limit); medians where several runs."), "",
             "| model | workers | stage | stage s | limit s | ratio |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        for n, run in r["runs"].items():
            for stage, limit in r["limits"].items():
                sec = run["stages"].get(stage)
                if sec is not None:
                    lines.append(f"| {name} | {n} | {stage} | {sec:.1f} | {limit:.1f} | "
                                 f"{sec / limit:.2f} |")
            lines.append(f"| {name} | {n} | whole compress (wall) | {run['wall']:.1f} | | |")
    lines += ["", "Commands:", ""] + [f"- {n}: `{r['command']}`" for n, r in results.items()]
    if "sharded" in results:
        lines += ["", "Sharded data-free compress vs the old serial 573.7 s "
                  "(reports/memory-sharded.md): " + ", ".join(
                      f"workers {n}: {OLD_SHARDED_SERIAL_S / run['wall']:.1f}× faster"
                      for n, run in results["sharded"]["runs"].items())]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sharded-workers", nargs="+", default=["auto", "1"],
                    help="compress --workers values for the sharded checkpoint (auto: default)")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "speed")
    ap.add_argument("--keep-plans", type=Path, help="copy each model's plan.json here")
    args = ap.parse_args()
    if "sharded" in args.models:
        from memory import generate
        generate(SHARDED, 24, 4, 2048, 8192)
    results = {}
    for name in args.models:  # the report is rewritten after each model
        results[name] = measure(name, args.repeats, args.sharded_workers, args.keep_plans)
        write_report(results, args.out, torch.get_num_threads())

if __name__ == "__main__":
    main()
