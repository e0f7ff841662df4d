"""The command line as users meet it: real subprocesses, exit codes, one-line errors, --json."""
from __future__ import annotations

import json

import pytest

from caitsearch import CompressionConfig, create_model
from conftest import assert_one_line_error, run_cli as run


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    model = create_model("deit_tiny_patch16_224", img_size=(64, 64))
    return model, CompressionConfig.dense(model).to_dict(), tmp_path_factory.mktemp("cfg")


@pytest.mark.parametrize("mutate,fragment", [
    (lambda d: d["blocks"].pop(), "config has 11 blocks but deit_tiny_patch16_224 has 12"),
    (lambda d: d["blocks"][0].update(merge_axis="rows", merge_count=3), "more than half of the 4 rows"),
    (lambda d: d["blocks"][3].update(keep_v=0), "keep_v is 0 but must be between 1 and 64"),
    (lambda d: d["blocks"][3].update(keep_qk=-4), "keep_qk is -4"),
    (lambda d: d["blocks"][5].update(keep_mlp=769), "keep_mlp is 769 but must be between 1 and 768"),
    (lambda d: d.update(model="resnet18"), "ResNet is not a timm VisionTransformer"),
])
@pytest.mark.slow
def test_invalid_config_exits_2_with_one_line(tiny_config, mutate, fragment):
    _, data, folder = tiny_config
    data = json.loads(json.dumps(data))
    mutate(data)
    path = folder / "bad.json"
    path.write_text(json.dumps(data))
    assert_one_line_error(run("inspect", "--config", str(path)), fragment)


@pytest.mark.slow
def test_not_a_vit_and_missing_files_exit_2(tmp_path):
    assert_one_line_error(run("inspect", "--model", "resnet18"), "not a timm VisionTransformer")
    assert_one_line_error(run("inspect", "--config", str(tmp_path / "nope.json")), "does not exist")
    (tmp_path / "broken.json").write_text("{not json")
    assert_one_line_error(run("inspect", "--config", str(tmp_path / "broken.json")), "not valid JSON")
    assert_one_line_error(run("bench", "--checkpoint", str(tmp_path / "missing.pth")), "does not exist")
    # a checkpoint holding code rather than weights is refused by the weights-only loader
    (tmp_path / "evil.pth").write_bytes(b"\x80\x04cos\nsystem\n.")
    assert_one_line_error(run("bench", "--checkpoint", str(tmp_path / "evil.pth")), "cannot read checkpoint")


@pytest.mark.slow
def test_inspect_json_and_bench_json(tiny_config, tmp_path):
    model, _, _ = tiny_config
    config = CompressionConfig.uniform(model, keep_rate=0.5, merge_every=4)
    path = tmp_path / "cfg.json"
    config.save(path)
    proc = run("inspect", "--config", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["mac_ratio"] < 0.6 and len(report["blocks"]) == 12
    assert report["blocks"][0]["grid_out"][1] == 4 - config.blocks[0].merge_count
    proc = run("bench", "--config", str(path), "--batch-size", "2", "--repeats", "3", "--warmup", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    bench = json.loads(proc.stdout)
    assert bench["dense"]["repeats"] == 3 and bench["speedup"] > 0 and bench["mac_ratio"] == report["mac_ratio"]


@pytest.mark.slow
def test_export_cli_writes_checked_onnx(tiny_config, tmp_path):
    model, _, _ = tiny_config
    path = tmp_path / "cfg.json"
    CompressionConfig.uniform(model, keep_rate=0.75, merge_every=6).save(path)
    out = tmp_path / "m.onnx"
    proc = run("export", "--config", str(path), "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["max_abs_diff"] <= 1e-3 and out.stat().st_size > 1e6


@pytest.mark.slow
def test_help_teaches():
    proc = run("bench", "--help")
    assert proc.returncode == 0 and "--batch-size" in proc.stdout and "Examples" in proc.stdout


@pytest.mark.slow
def test_strategies_on_bench(tmp_path, tiny_config, quick_profile):
    model, _, _ = tiny_config
    assert_one_line_error(run("bench", "--strategy", "pruneall", "--budget", "0.6"), "unknown strategy 'pruneall'")
    path = tmp_path / "cait.json"
    CompressionConfig.uniform(model, keep_rate=0.5, merge_every=4).save(path)
    assert_one_line_error(run("bench", "--strategy", "tome", "--config", str(path)), "not a tome config")
    assert_one_line_error(run("bench", "--config", str(path), "--budget", "0.6"), "not both")
    # the default model's ToMe schedule predicted under 0.6x dense: the same r in every block, no pruning
    proc = run("bench", "--strategy", "tome", "--budget", "0.6", "--profile", quick_profile, "--batch-size", "2",
               "--repeats", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    blocks = json.loads(proc.stdout)["config"]["blocks"]
    assert {b["merge_axis"] for b in blocks} <= {"tokens", "none"} and blocks[0]["merge_axis"] == "tokens"
    assert len({b["keep_mlp"] for b in blocks}) == 1
