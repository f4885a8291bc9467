"""`visroute bench`'s batched decode: per config and batch size the step times, tokens per second, the K/V the
cache holds and reads, and the bandwidth ideal, each recomputed here from the shape's dimensions and the
record's per-layer K/V counts; the decode batch flag's errors."""

import statistics

import pytest

from visroute.accounting import DecoderDims
from visroute.bench import BenchSettings, build_model, make_inputs, run_bench
from visroute.bench.shapes import repeat_inputs
from visroute.budget import preset
from visroute.cli import main

SHAPE = "llava-1.5-tiny"
NEW_TOKENS = 3


@pytest.fixture(scope="module")
def result():
    settings = BenchSettings(shape=SHAPE, dtype="float32", repeats=1, warmup=0, prefill_batch=2,
                             new_tokens=NEW_TOKENS, decode_repeats=2, decode_batches="1,3", text_tokens=16,
                             memory=False)
    cfg = preset("pdrop", 64, SHAPE, num_visual=576)
    return run_bench(settings, [("pdrop@64", cfg)], progress=False)


def test_every_config_is_timed_at_every_decode_batch(result):
    labels = [r["label"] for r in result["results"]]
    assert labels == ["unrouted", "keep-all (routed)", "pdrop@64"]
    assert [r["label"] for r in result["decode_only"]] == ["unrouted (StaticCache)"]
    for r in result["results"]:
        assert r["prefill_batch"] == 2
    for r in result["results"] + result["decode_only"]:
        assert [d["batch"] for d in r["decode"]] == [1, 3]
        for d in r["decode"]:
            assert len(d["step_times"]) == d["step_s"]["n"] == (NEW_TOKENS - 1) * 2  # warm-up step untimed
            assert d["tokens_per_s"] == pytest.approx(d["batch"] / statistics.median(d["step_times"]))
        assert r["decode_step_s"] == r["decode"][0]["step_s"]  # batch 1 under its earlier name


def test_kv_bytes_held_and_read_follow_the_record_and_the_shape(result):
    model_config = result["model_config"]
    dims = DecoderDims(**model_config["decoder"])
    per_token = 2 * dims.kv_heads * dims.head_dim * 4  # keys and values, float32
    length = model_config["prompt_tokens"]
    unrouted, keep_all, routed = result["results"]
    assert unrouted["kv_active_tokens"] == [length] * dims.num_layers
    assert keep_all["kv_active_tokens"] == [length] * dims.num_layers
    entries = routed["kv_active_tokens"]
    assert entries[-1] < entries[0] == length  # pdrop drops from layer 2 on
    decoded = (2 + NEW_TOKENS) / 2  # mean tokens decoded, the current one included, over timed steps 2..NEW_TOKENS
    for row in result["results"] + result["decode_only"]:
        prompt = row["kv_active_tokens"]
        for d in row["decode"]:
            b = d["batch"]
            # held: every layer's prompt entries + one entry per decode step (the unrouted DynamicCache grows to
            # exactly that; the static caches, routed or not, were allocated with room for the steps)
            assert d["kv_bytes"] == b * sum(n + NEW_TOKENS for n in prompt) * per_token
            assert d["kv_read_bytes"] == pytest.approx(b * sum(n + decoded for n in prompt) * per_token)
            assert d["step_bytes"] == pytest.approx(model_config["decode_step_weight_bytes"] + d["kv_read_bytes"])
    weights = model_config["decode_step_weight_bytes"]
    assert 0 < weights < model_config["weight_bytes"]


def test_decode_speedups_against_the_bandwidth_ideal(result):
    base, keep_all, routed = result["results"]
    static = result["decode_only"][0]
    for d, b, k, st in zip(routed["decode"], base["decode"], keep_all["decode"], static["decode"]):
        assert d["speedup_vs_static"] == pytest.approx(st["step_s"]["median"] / d["step_s"]["median"])
        assert d["speedup"] == pytest.approx(b["step_s"]["median"] / d["step_s"]["median"])
        assert d["ideal_speedup"] == pytest.approx(b["step_bytes"] / d["step_bytes"])
        assert d["ideal_speedup"] > 1
        assert d["fraction_of_ideal"] == pytest.approx(d["speedup"] / d["ideal_speedup"])
        assert d["fraction_of_ideal_gain"] == pytest.approx((d["speedup"] - 1) / (d["ideal_speedup"] - 1))
        assert d["speedup_vs_keep_all"] == pytest.approx(k["step_s"]["median"] / d["step_s"]["median"])
    assert routed["decode"][1]["ideal_speedup"] > routed["decode"][0]["ideal_speedup"]  # K/V weighs more at batch 3
    for d in keep_all["decode"]:
        assert d["ideal_speedup"] == pytest.approx(1.0) and d["fraction_of_ideal_gain"] is None


def test_repeat_inputs_copies_the_prompt_and_its_image():
    model = build_model("qwen2.5-vl-tiny")
    one = make_inputs(model, "qwen2.5-vl-tiny", text_tokens=8, image_size=(224, 224))
    three = repeat_inputs(one, 3)
    for k, v in one.items():
        assert three[k].shape[0] == 3 * v.shape[0] and (three[k][: v.shape[0]] == v).all()
    assert (three["image_grid_thw"] == one["image_grid_thw"]).all(1).all()


def test_decode_batch_flag_errors(capsys):
    assert main(["bench", "--shape", SHAPE, "--decode-batches", "1,x"]) == 2
    assert "Bad decode_batches '1,x'" in capsys.readouterr().err
    assert main(["bench", "--shape", SHAPE, "--prefill-batch", "0"]) == 2
    assert "prefill_batch must be at least 1" in capsys.readouterr().err


def test_prefill_and_decode_runs_are_interleaved(monkeypatch):
    """Every config is timed once per round, the order rotating; with stand-in timers the speedups follow."""
    import visroute.bench.run as run

    seen = []

    def active(model):
        router = getattr(model, "_visroute_router", None)
        return "unrouted" if router is None else ("keep-all" if not router.config.stages else "pdrop")

    def fake_prefill(model, inputs, device, repeats):
        seen.append(("prefill", active(model), inputs["input_ids"].shape[0]))
        return [{"unrouted": 4.0, "keep-all": 4.0, "pdrop": 2.0}[active(model)]]

    def fake_decode(model, inputs, device, batch, steps, repeats, static):
        name = active(model) + (" static" if static and active(model) == "unrouted" else "")
        seen.append(("decode", name, batch))
        assert static == (name != "unrouted")  # routed rows decode on their preallocated cache
        times = {"unrouted": 3.0, "unrouted static": 2.5, "keep-all": 2.0, "pdrop": 1.0}
        return [times[name] * batch] * (steps - 1), 1

    monkeypatch.setattr(run, "time_prefill", fake_prefill)
    monkeypatch.setattr(run, "time_batched_decode", fake_decode)
    settings = BenchSettings(shape=SHAPE, dtype="float32", repeats=2, warmup=0, prefill_batch=3, new_tokens=3,
                             decode_repeats=2, decode_batches="1,4", text_tokens=8, memory=False)
    result = run_bench(settings, [("pdrop@64", preset("pdrop", 64, SHAPE, num_visual=576))], progress=False)
    order = ["unrouted", "keep-all", "pdrop", "keep-all", "pdrop", "unrouted"]
    decode = ["unrouted", "unrouted static", "keep-all", "pdrop", "unrouted static", "keep-all", "pdrop", "unrouted"]
    assert seen == ([("prefill", name, 3) for name in order] + [("decode", name, 1) for name in decode]
                    + [("decode", name, 4) for name in decode])
    base, keep_all, routed = result["results"]
    assert routed["prefill_speedup"] == 2.0 and keep_all["prefill_speedup"] == 1.0
    assert [d["speedup"] for d in routed["decode"]] == [3.0, 3.0]
    assert [d["speedup_vs_keep_all"] for d in routed["decode"]] == [2.0, 2.0]
    assert [d["speedup_vs_static"] for d in routed["decode"]] == [2.5, 2.5]
    assert [d["speedup"] for d in result["decode_only"][0]["decode"]] == [1.2, 1.2]
    assert routed["decode"][1]["tokens_per_s"] == 4 / 4.0
