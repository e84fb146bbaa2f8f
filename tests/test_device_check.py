"""scripts/device_check.sh: the CPU smoke runs every check end to end, so the GPU run cannot
fail on a typo; its argument errors are one line each."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from refiner_pl import device_check
from refiner_pl.device_check import GPU, counting_refiner_paths, main

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "device_check.sh"


@pytest.mark.slow
def test_cpu_smoke_runs_every_check_and_writes_both_reports(tmp_path):
    # The process boundary is the point: the shell script as the GPU machine will run it.
    out = tmp_path / "report"
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(tmp_path)}
    result = subprocess.run(
        ["bash", str(SCRIPT), "--cpu-smoke", str(out)],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )  # fmt: skip
    report = json.loads((out / "device_check.json").read_text())
    checks = {check["name"]: check for check in report["checks"]}
    failed = {n: c["error"] or c["notes"] for n, c in checks.items() if c["status"] != "pass"}
    assert result.returncode == 0 and not failed, (failed, result.stdout[-3000:])
    expected = [check.name for check in device_check.checks_for(device_check.CPU_SMOKE)]
    assert list(checks) == expected

    # every check reports numbers that mean what they say
    fixture = checks["release_fixture"]["numbers"]
    assert fixture["max_abs_diff_eval_logits"] <= device_check.FIXTURE_ATOL
    assert checks["fused_cpu_path"]["numbers"]["calls_train_fp32"] > 0  # the probe sees it
    assert checks["fused_cpu_path"]["numbers"]["calls_train_bf16"] == 0
    smoke = device_check.CPU_SMOKE
    steps_per_epoch = smoke.fit_steps_per_epoch
    for precision in ("16-mixed", "bf16-mixed"):
        fit = checks[f"fit_{precision.replace('-', '_')}"]["numbers"]
        assert fit["steps"] == steps_per_epoch * smoke.fit_epochs
        assert fit["last5_mean_loss"] < fit["first5_mean_loss"]
    resume = checks["resume_last"]["numbers"]
    stop = steps_per_epoch * smoke.resume_stop_epoch
    assert (resume["stopped_at_step"], resume["resumed_from_step"]) == (stop, stop)
    assert resume["final_step"] == steps_per_epoch * smoke.fit_epochs
    assert resume["max_rel_loss_diff_vs_uninterrupted"] <= device_check.RESUME_RTOL
    assert checks["compile"]["numbers"]["max_rel_loss_diff"] <= device_check.COMPILE_RTOL
    assert "graph_breaks_train_refiner_ckpt" in checks["compile"]["numbers"]
    assert checks["ddp_one_gpu"]["numbers"]["strategy"] == "DDPStrategy"
    bench = checks["benchmark tiny 16 refiner ckpt compiled"]["numbers"]
    assert bench["refiner_train_img_s"] > 0 and bench["baseline_infer_img_s"] > 0
    assert (out / "bench" / "tiny_16_refiner_ckpt_compiled.json").is_file()

    markdown = (out / "device_check.md").read_text()
    assert "| resume_last | pass |" in markdown
    assert "What a one-GPU machine cannot show" in markdown
    assert "What this smoke run substitutes" in markdown
    assert "device check:" in result.stdout and "PASS" in result.stdout


def test_probe_counts_the_fused_refiner_on_cpu_training_only():
    model = device_check._create("refiner_vit_tiny", 32)
    x, y = device_check._batch(2, 32, torch.device("cpu"))
    with counting_refiner_paths() as paths:
        torch.nn.functional.cross_entropy(model.train()(x), y).backward()
    with counting_refiner_paths() as eval_paths, torch.no_grad():
        model.eval()(x)
    assert paths["fused"] == 2 and eval_paths["fused"] == 0  # tiny: 2 shared blocks


def test_gpu_profile_is_consistent():
    # What the CPU smoke cannot run: every GPU benchmark and fit size fits its data.
    assert GPU.classes * GPU.train_per_class % GPU.fit_batch == 0
    assert 0 < GPU.resume_stop_epoch < GPU.fit_epochs
    labels = [bench.label for bench in GPU.benchmarks]
    assert len(set(labels)) == len(labels)
    required = sum(c.budget_s for c in device_check.checks_for(GPU) if c.required)
    assert required <= GPU.budget_s  # the budget in scripts/device_check.sh's header


@pytest.mark.parametrize(
    "args, message",
    [
        (["--only", "nope", "--cpu-smoke"], "--only: unknown checks ['nope']"),
        (["--cpu-smoke", "--budget", "0"], "--budget 0: give a positive number of seconds"),
        ([], "no CUDA device here"),
    ],
)
def test_bad_arguments_are_one_line(tmp_path, capsys, args, message):
    if not args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "out"), *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_an_existing_report_is_kept(tmp_path, capsys):
    (tmp_path / "device_check.json").write_text("{}")
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--cpu-smoke"])
    assert "already holds a device check report" in capsys.readouterr().err
    assert (tmp_path / "device_check.json").read_text() == "{}"
