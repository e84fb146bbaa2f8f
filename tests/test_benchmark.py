"""The benchmark command runs (on a tiny preset); its numbers are not tested here."""

import json
import sys

import pytest
import torch

from refiner_pl import benchmark


def test_throughput_command_writes_a_table_and_json(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench.json"
    argv = [
        "benchmark", "throughput", "--model", "refiner_vit_tiny", "--img_size", "32",
        "--batch_size", "2", "--rounds", "1", "--train_steps", "1", "--infer_steps", "1",
        "--memory", "false", "--checkpointing", "refiner", "--out", str(out),
        # process-wide and permanent: not in the test process (tests/callbacks/test_cpu_memory.py)
        "--keep_freed_memory", "false",
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    benchmark.main()
    result = json.loads(out.read_text())
    assert result["config"]["img_size"] == 32 and result["config"]["checkpointing"] == "refiner"
    assert result["config"]["keep_freed_memory"] is False
    assert set(result["models"]) == {"refiner_vit_tiny", "deit_small_patch16_224"}
    for entry in result["models"].values():
        assert entry["train_img_s"] > 0 and entry["infer_img_s"] > 0
    ours, base = result["models"]["refiner_vit_tiny"], result["models"]["deit_small_patch16_224"]
    assert result["ratio"]["train"] == ours["train_img_s"] / base["train_img_s"]
    table = capsys.readouterr().out
    assert "refiner_vit_tiny" in table and "ratio" in table and f"wrote {out}" in table


# slow: starts a process (~11 s)
@pytest.mark.slow
def test_peak_memory_of_a_step_is_measured_in_a_fresh_process():
    cfg = dict(
        model="refiner_vit_tiny", model_kwargs={}, checkpointing="off", img_size=32,
        batch_size=2, precision="fp32", channels_last=False, compile=False, threads=1,
        keep_freed_memory=True,  # in the child process
    )  # fmt: skip
    peak = benchmark._peak_memory_mb("refiner_vit_tiny", cfg, "train", torch.device("cpu"))
    assert 0 < peak < 2048


def test_lightning_overhead_compares_the_fit_loop_with_a_plain_loop(tmp_path):
    out = tmp_path / "overhead.json"
    result = benchmark.lightning_overhead(epochs=2, rounds=1, limit_batches=2, out=str(out))
    assert result == json.loads(out.read_text())
    assert result["steps_per_epoch"] == 2 and result["timed_epochs"] == 1
    assert result["lightning_s_per_step"] > 0 and result["plain_s_per_step"] > 0
    expected = result["lightning_s_per_step"] / result["plain_s_per_step"] - 1
    assert abs(result["overhead"] - expected) < 1e-12
