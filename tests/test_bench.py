"""`visroute bench` on tiny shapes, and the real shapes' configs."""

import json

import pytest
import torch

from visroute.bench import build_model, make_inputs, model_config
from visroute.budget import preset_solution
from visroute.cli import main


def test_bench_cli_runs_a_tiny_shape(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--shape", "llava-1.5-tiny", "--dtype", "float32", "--preset", "fastv@128",
               "--stages", "2:200,7:50", "--action", "reroute", "--repeats", "2", "--warmup", "0",
               "--new-tokens", "3", "--decode-repeats", "1", "--text-tokens", "16", "--no-keep-all",
               "--quiet", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "fastv@128" in printed and "% ideal" in printed
    result = json.loads(out.read_text())
    base, fv, staged = result["results"]
    assert base["label"] == "unrouted" and fv["label"] == "fastv@128"
    assert fv["avg_T"] == pytest.approx(preset_solution("fastv", 128)[0].avg_T)
    assert staged["avg_T"] == pytest.approx((2 * 576 + 5 * 200 + 25 * 50) / 32)
    for row in (fv, staged):
        acc = row["accounting"]
        assert acc["kv_bytes"] < base["accounting"]["kv_bytes"]
        assert row["ideal_speedup"] == pytest.approx(
            base["accounting"]["flops"]["total"] / acc["flops"]["total"])
        assert acc["flops_unrouted"]["total"] == base["accounting"]["flops"]["total"]
        assert row["scoring_s"]["n"] == 2 and row["decode_step_s"]["n"] == 2
        assert 0 < row["peak_bytes"] < base["peak_bytes"]
    assert base["prefill_s"]["n"] == 2 and base["accounting"]["kv_bytes"] == base["accounting"]["kv_bytes_unrouted"]
    assert result["machine"]["torch"] == torch.__version__


def test_bench_cli_errors(capsys):
    assert main(["bench", "--shape", "nope"]) == 2
    assert "Unknown model shape" in capsys.readouterr().err
    assert main(["bench", "--shape", "llava-1.5-tiny", "--preset", "fastv@100"]) == 2
    assert "tier" in capsys.readouterr().err


@pytest.mark.parametrize("name,params", [("llava-1.5-7b", 7_063_427_072), ("qwen2.5-vl-7b", 8_292_166_656),
                                         ("qwen2.5-vl-3b", 3_754_622_976)])
def test_real_shapes_have_the_published_parameter_counts(name, params):
    from visroute.bench.shapes import family_of

    config = model_config(name)
    with torch.device("meta"):
        model = family_of(name).model_class(config)(config)
    assert sum(p.numel() for p in model.parameters()) == params


def test_tiny_qwen_shape_generates_with_routing():
    from visroute.budget import preset
    from visroute import apply_routing

    model = build_model("qwen2.5-vl-tiny", torch.float32)
    inputs = make_inputs(model, "qwen2.5-vl-tiny", text_tokens=8, image_size=(448, 448))
    nv = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert nv == 256
    with apply_routing(model, preset("pdrop", 64, "qwen2.5-vl-7b", num_visual=nv)) as router, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert router.last_record.avg_T == pytest.approx(preset_solution("pdrop", 64, "qwen2.5-vl-7b", nv)[0].avg_T)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert torch.isfinite(model(**inputs).logits).all()
