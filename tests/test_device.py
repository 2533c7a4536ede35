"""--device: resolution, plumbing into every computing stage, the whitening memo, and shared
calibration terms (issue 13). No GPU here: the plumbing is checked on CPU through the same path."""

import pytest
import torch
from torch import nn

import lowrank
from lowrank.device import autocast_dtype, dtype_name, float64_device, pass_dtype, resolve_device
from lowrank.errors import InputError
from lowrank.pipeline.runner import _device_key
from lowrank.pipeline.spec import read_pipeline
from lowrank.pipeline.stage import STAGES
from lowrank.stages import analyze as analyze_mod
from lowrank.stages import calibrate as calibrate_mod
from lowrank.stages import factorize as factorize_mod
from lowrank.stages import recover as recover_mod
from lowrank.stages.calibrate import ActivationStats, CalibrateSettings, collect_stats


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) in ("cpu", "mps") and resolve_device("auto") == resolve_device(None)
    with pytest.raises(InputError, match="no CUDA"):
        resolve_device("cuda")
    with pytest.raises(InputError, match="device must be one of"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == "cuda" and resolve_device("cuda:1") == "cuda:1"
    # MPS has no float64: that work stays on CPU.
    assert float64_device("mps") == "cpu" and float64_device("cuda:0") == "cuda:0"


def test_pass_dtype_is_bfloat16_only_where_the_cpu_has_it(monkeypatch):
    assert pass_dtype("float32") == torch.float32 and pass_dtype("bfloat16") == torch.bfloat16
    for caps, dtype in (({"avx512_bf16": True}, torch.bfloat16), ({"amx_bf16": True},
                        torch.bfloat16), ({"avx512_f": True}, torch.float32), ({}, torch.float32)):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda caps=caps: caps)
        assert pass_dtype("auto") == dtype
    with pytest.raises(InputError, match="dtype must be one of"):
        pass_dtype("float16")
    # CPU autocast only: passes on an accelerator run as they are
    assert autocast_dtype("bfloat16") == autocast_dtype("bfloat16", "cpu:0") == torch.bfloat16
    assert autocast_dtype("bfloat16", "cuda") == torch.float32
    with pytest.raises(InputError, match="compensate_dtype must be one of"):
        factorize_mod.FactorizeSettings(compensate_dtype="fp16")


def test_device_is_in_cache_keys_off_cpu_only():
    assert _device_key(STAGES["factorize"], "cpu") == {}
    assert _device_key(STAGES["factorize"], "cuda:1") == {"device": "cuda"}
    assert _device_key(STAGES["plan"], "cuda") == {}
    assert all(STAGES[s].on_device for s in ("calibrate", "analyze", "factorize", "recover"))


def test_pipeline_file_device_key(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('stages = ["analyze"]\ndevice = "cpu"\n')
    assert read_pipeline(path).device == "cpu"
    path.write_text('stages = ["analyze"]\ndevice = 1\n')
    with pytest.raises(InputError, match="device must be a string"):
        read_pipeline(path)


def test_device_reaches_every_computing_stage(tiny_bert_dir, tmp_path, monkeypatch):
    """"cpu:0" is a device string no default produces: each stage must pass it down."""
    seen = {}

    def spy(module, name, key):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            seen.setdefault(name, set()).add(key(args, kwargs))
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)

    spy(calibrate_mod, "collect_stats", lambda a, k: k["device"])
    spy(analyze_mod, "analyze_task", lambda a, k: a[5])
    spy(factorize_mod, "factor_task", lambda a, k: a[7])
    spy(recover_mod, "distill", lambda a, k: a[6])
    spec = lowrank.compress_spec(calibration_file="", calibration={"samples": 16},
                                 recover_method="lora",
                                 recover={"steps": 2, "samples": 16, "batch_size": 8})
    run = lowrank.run_pipeline(spec, tiny_bert_dir, tmp_path / "out", device="cpu:0")
    run.release()
    assert seen == {"collect_stats": {"cpu:0"}, "analyze_task": {"cpu:0"},
                    "factor_task": {"cpu:0"}, "distill": {"cpu:0"}}
    assert run.manifest["device"] == "cpu:0"
    resolved = {r["stage"]: r.get("resolved") for r in run.manifest["stages"]}
    auto = dtype_name(pass_dtype("auto"))  # what "auto" is on this CPU
    assert resolved["calibrate"] == {"forward_dtype": auto}
    assert resolved["factorize"] == {"compensate_damping": 0.1, "compensate_residual_share": 0.3,
                                     "compensate_lines": 1.0,
                                     "compensate_dtype": auto}  # an encoder's (no top-up)
    assert resolved["recover"] == {"dtype": auto, "sampled_text": False}


def test_auto_pass_dtypes_are_resolved_for_the_manifest_and_cache_keys(tiny_bert_dir, tmp_path,
                                                                       monkeypatch):
    calibrate, factorize, recover = (STAGES[s].resolved for s in ("calibrate", "factorize",
                                                                  "recover"))
    calibrated = {"calibrate": ActivationStats()}
    for caps, name in (({"avx512_bf16": True}, "bfloat16"), ({}, "float32")):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda caps=caps: caps)
        assert calibrate(CalibrateSettings(), "cpu", {}) == {"forward_dtype": name}
        assert factorize(factorize_mod.FactorizeSettings(), "cpu", calibrated)[
            "compensate_dtype"] == name
        assert recover(recover_mod.RecoverSettings(), "cpu", {}) == {"dtype": name,
                                                                     "sampled_text": False}
        # no autocast on an accelerator; kfac differentiates its passes: float32
        assert calibrate(CalibrateSettings(), "cuda", {}) == {"forward_dtype": "float32"}
        assert calibrate(CalibrateSettings(method="kfac"), "cpu", {}) == {
            "forward_dtype": "float32"}
        # data-free or sequential: compensation runs no passes
        assert factorize(factorize_mod.FactorizeSettings(), "cpu", {}) == {}
        assert factorize(factorize_mod.FactorizeSettings(sequential=True), "cpu",
                         calibrated) == {}
    # A cached calibration made in bf16 is not reused where "auto" means float32.
    spec = lowrank.compress_spec(calibration_file="", calibration={"samples": 8})
    runs = []
    for caps in ({"avx512_bf16": True}, {}):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda caps=caps: caps)
        run = lowrank.run_pipeline(spec, tiny_bert_dir, tmp_path / f"out{len(runs)}",
                                   cache_dir=tmp_path / "cache")
        run.release()
        runs.append(next(r for r in run.manifest["stages"] if r["stage"] == "calibrate"))
    assert [r["resolved"] for r in runs] == [{"forward_dtype": "bfloat16"},
                                             {"forward_dtype": "float32"}]
    assert runs[0]["key"] != runs[1]["key"] and not runs[1]["cached"]


def test_whitening_factor_is_computed_once_per_gram(monkeypatch):
    calls = []
    real = calibrate_mod.psd_root
    monkeypatch.setattr(calibrate_mod, "psd_root", lambda g, d=None: calls.append(d) or real(g, d))
    x = torch.randn(50, 6, dtype=torch.float64)
    g = x.T @ x
    stats = ActivationStats(grams={"q.weight": g, "k.weight": g.clone(), "o.weight": g + 1},
                            abs_sums={n: x.abs().sum(0) for n in ("q.weight", "k.weight",
                                                                  "o.weight")}, tokens=50)
    first = stats.weighting("q.weight", 6)
    assert torch.equal(first.factor, real(g))  # the same bytes as computing it directly
    assert stats.weighting("q.weight", 6).factor is first.factor  # analyze, then factorize
    assert stats.weighting("k.weight", 6).factor is first.factor  # an equal Gram
    stats.weighting("o.weight", 6)
    assert len(calls) == 2


def test_memo_is_bounded(monkeypatch):
    monkeypatch.setattr(calibrate_mod, "WHITENING_MEMO_BYTES", 2 * 6 * 6 * 8)
    grams = {f"l{i}.weight": torch.eye(6, dtype=torch.float64) * (i + 1) for i in range(4)}
    stats = ActivationStats(grams=grams, abs_sums={n: torch.ones(6) for n in grams}, tokens=1)
    for name in grams:
        stats.weighting(name, 6)
    assert len(stats.memo) == 2


class _Attention(nn.Module):
    """q and k read the same input; v reads it after an in-place change."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(5, 3), nn.Linear(5, 3), nn.Linear(5, 3)

    def forward(self, x):
        out = self.q(x) + self.k(x)
        x.mul_(2)
        return out + self.v(x)


class _OneLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 48)

    def forward(self, x):
        return self.proj(x)


def test_float32_batch_grams_keep_the_whitened_spectrum():
    """Each batch's Gram is a float32 GEMM (twice float64's speed), summed over batches in
    float64: with a massive-activation channel (1000× the others), the Gram and the whitened
    spectrum stay within 1e-6 of all-float64 arithmetic."""
    gen = torch.Generator().manual_seed(0)
    model = _OneLinear()
    x = torch.randn(32, 16, 64, generator=gen)
    x[..., 3] *= 1000
    stats = collect_stats(model, None, {"x": x},  # proj is wide: its input Gram, asked for
                          CalibrateSettings(batch_size=8, output_grams=False))
    rows = x.reshape(-1, 64).double()
    expect = rows.T @ rows
    got = stats.grams["proj.weight"]
    assert float((got - expect).norm() / expect.norm()) < 1e-6
    w = model.proj.weight.detach().double()
    s64 = torch.linalg.svdvals(w @ torch.linalg.cholesky(expect))
    s32 = torch.linalg.svdvals(w @ torch.linalg.cholesky(got))
    assert float((s32 - s64).abs().max() / s64[0]) < 1e-6


def test_calibration_shares_terms_only_for_equal_inputs():
    torch.manual_seed(0)
    model = _Attention()
    data = {"x": torch.randn(8, 4, 5)}
    orig = data["x"].clone()  # the model doubles its input in place
    stats = collect_stats(model, None, data, CalibrateSettings(batch_size=3, method="scale"))
    x = orig.reshape(-1, 5).double()
    expect = sum(b.reshape(-1, 5).double().T @ b.reshape(-1, 5).double() for b in orig.split(3))
    assert torch.allclose(stats.grams["q.weight"], expect)
    assert torch.equal(stats.grams["q.weight"], stats.grams["k.weight"])
    assert torch.allclose(stats.grams["v.weight"], 4 * expect)
    assert torch.allclose(stats.abs_sums["v.weight"], 2 * x.abs().sum(0))
    assert stats.grams["q.weight"] is not stats.grams["k.weight"]  # own storage each
