"""The calibration top-up's sampling (lowrank.sample_text, issue 13): transformers' own
`generate(do_sample=True)` (torch.multinomial, float32 weights) against lowrank's sampler
(an inverse-CDF draw, weights in `SampleTextSettings.dtype`) for the same sequences: as many
and as long as the default calibration of MODEL samples (the Debian calibration text's
top-up), from the same start token. Medians of --repeats runs each, alternating. Then what
the bfloat16 copy changes: its next-token distribution's KL to float32's on 40 python_docs
paragraphs.

    python benchmarks/sampling_speed.py [--model DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from calibration_text import calibration_file
from sampled_calibration import lines_of

DEFAULT_MODEL = "/root/.cache/smollm2-135m"


def main():
    from lowrank.io.checkpoint import open_checkpoint
    from lowrank.io.samples import token_count
    from lowrank.models import Models
    from lowrank.sample_text import sample_text, sampling_model, start_token
    from lowrank.stages.calibrate import CalibrateSettings
    from lowrank.stages.calibration_text import calibration_data, top_up_sampling

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    text = str(calibration_file())
    calib = CalibrateSettings(calibration_file=text)
    model, tokenizer, data = calibration_data(Models(open_checkpoint(args.model)), calib,
                                              warn=False)
    missing = calib.tokens - token_count(data, tokenizer, calib.max_length)
    base = top_up_sampling(calib, missing)
    length = base.length
    settings = {dtype: dataclasses.replace(base, dtype=dtype) for dtype in ("float32", "auto")}
    ids = torch.full((settings["auto"].rows, 1), start_token(tokenizer, model.config))

    def transformers_generate():
        torch.manual_seed(0)
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                           temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=length,
                           min_new_tokens=1, pad_token_id=tokenizer.eos_token_id)

    runs = {"transformers generate (multinomial, float32)": transformers_generate,
            "lowrank sample_text, float32 weights": lambda: sample_text(model, tokenizer,
                                                                        settings["float32"]),
            "lowrank sample_text, dtype auto": lambda: sample_text(model, tokenizer,
                                                                   settings["auto"])}
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    # What the bf16 copy changes in the distribution sampled from: KL per token to float32's
    paragraphs = lines_of("python_docs.txt", 0, 10**9)[:40]
    half = sampling_model(model, "bfloat16")
    kl = tokens = 0.0
    with torch.inference_mode():
        for paragraph in paragraphs:
            ids = tokenizer(paragraph, return_tensors="pt", truncation=True,
                            max_length=calib.max_length)["input_ids"]
            p = torch.log_softmax(model(ids).logits.float(), -1)
            q = torch.log_softmax(half(ids).logits.float(), -1)
            kl += float((p.exp() * (p - q)).sum())
            tokens += ids.shape[1]
    print(f"bfloat16 copy against float32 weights: KL {kl / tokens:.4f} per token "
          f"({tokens:.0f} tokens of {len(paragraphs)} python_docs paragraphs)")
    print(f"{settings['auto'].rows} sequences of up to {length} tokens "
          f"({missing:,} tokens missing from {text}); median of {args.repeats}:")
    for name, seconds in times.items():
        print(f"  {name}: {statistics.median(seconds):.1f} s "
              f"({', '.join(f'{s:.1f}' for s in seconds)})")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
