"""`python -m refiner_pl.analysis.data_efficiency`: the grid, its resume, failures, bad input;
and the datamodules' ``train_fraction`` it trains on."""

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from refiner_pl.analysis import data_efficiency
from refiner_pl.analysis.data_efficiency import main
from refiner_pl.data import DigitsDataModule
from refiner_pl.errors import UserInputError

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = "configs/quickstart.yaml"
# Small enough for a test: 16 px digits, a 2-block model, one validation batch.
TINY_FIT = [
    "--data.init_args.img_size", "16",
    "--model.init_args.model_kwargs", '{"depth": 2}',
    "--trainer.limit_val_batches", "0.2",  # one batch of 64
    "--trainer.limit_train_batches", "4",
    "--trainer.callbacks", "null",
]  # fmt: skip


def class_counts(subset) -> Counter:
    return Counter(int(subset.dataset.targets[i]) for i in subset.indices)


def test_train_fraction_is_stratified_drawn_from_the_seed_and_leaves_val_whole(monkeypatch):
    def subset(seed: int, fraction: float):
        monkeypatch.setenv("PL_GLOBAL_SEED", str(seed))
        datamodule = DigitsDataModule(train_fraction=fraction)
        datamodule.setup("fit")
        return datamodule.train_set, datamodule.val_set

    whole, whole_val = subset(0, 1.0)
    per_class = Counter(int(label) for label in whole.targets)
    quarter, quarter_val = subset(0, 0.25)
    assert class_counts(quarter) == {c: round(0.25 * n) for c, n in per_class.items()}
    assert len(quarter_val) == len(whole_val) == 360
    again, _ = subset(0, 0.25)
    other_seed, _ = subset(1, 0.25)
    assert again.indices == quarter.indices
    assert other_seed.indices != quarter.indices
    assert class_counts(other_seed) == class_counts(quarter)
    tiny, _ = subset(0, 0.001)  # every class keeps at least one image
    assert class_counts(tiny) == {c: 1 for c in per_class}


@pytest.mark.parametrize("fraction", [0, -0.5, 1.5])
def test_bad_train_fraction_is_one_clear_error(fraction):
    with pytest.raises(UserInputError, match=rf"train_fraction is {fraction}: use a value in"):
        DigitsDataModule(train_fraction=fraction)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fractions", "[0.5, 1.5]"], "--fractions [1.5]: every share of the train split"),
        (["--fractions", "[0.5, 0.5]"], "give distinct values"),
        (["--models", "[refiner, deit]"], "give distinct names out of refiner, plain_vit"),
        (["--seeds", "0"], "--seeds is 0"),
        (["--threads", "0"], "--threads is 0"),
        (["--budget", "time"], "budget"),
        (["--config", "missing.yaml"], "--config 'missing.yaml' does not exist"),
        # 1% of each digit class is one image: 10, not one batch of 64
        (["--fractions", "[0.01]"], "fraction 0.01 leaves 10 train images, fewer than one batch"),
        (["--", "--model.init_args.model_kwargs", '{"refiner": false}'], "refiner on"),
        (["--epochs", "0"], "epochs is 0"),
        (["--", "--trainer.max_epochs", "null"], "epochs is None: give --epochs"),
    ],
)
def test_bad_input_is_one_error_line_before_any_run(args, message, tmp_path, capsys):
    if "--config" not in args:
        args = ["--config", CONFIG, *args]
    split = args.index("--") if "--" in args else len(args)
    args = [*args[:split], "--out", str(tmp_path / "out"), *args[split:]]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    stderr = capsys.readouterr().err.strip()
    assert stderr.startswith("error: ") and "\n" not in stderr, stderr
    assert message in stderr
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def read_results(out: Path) -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in (out / "results").glob("*.json")}


@pytest.mark.slow
def test_tiny_grid_records_failures_and_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "grid"
    args = [
        "--config", CONFIG, "--out", str(out), "--models", "[refiner, plain_vit]",
        "--fractions", "[0.1, 0.25]", "--seeds", "1", "--first_seed", "7", "--epochs", "1",
        "--", *TINY_FIT,
    ]  # fmt: skip
    real_fit_run = data_efficiency.fit_run

    def failing_plain_vit(run_args: list[str]) -> dict:
        if '{"depth": 2, "refiner": false}' in run_args and "0.1" in run_args:
            raise RuntimeError("out of memory (simulated)\nsecond line")
        return real_fit_run(run_args)

    monkeypatch.setattr(data_efficiency, "fit_run", failing_plain_vit)
    main(args)
    printed = capsys.readouterr().out
    assert printed.count(": training ...") == 4
    assert "[2/4] plain_vit fraction 0.1 seed 7: FAILED after" in printed

    results = read_results(out)
    assert set(results) == {
        f"{model}_fraction_{fraction}_seed_7"
        for model in ("refiner", "plain_vit")
        for fraction in ("0.1", "0.25")
    }
    failed = results["plain_vit_fraction_0.1_seed_7"]
    assert failed["status"] == "failed"
    assert failed["error"] == "RuntimeError: out of memory (simulated)"
    assert "Traceback" in failed["traceback"]
    # An epoch of all 1,437 train images is 4 steps (limit_train_batches), and so is every
    # run: 10% has 2 batches of 64 an epoch, 25% 5 (limited to 4).
    for key, train_images, epochs in [
        ("refiner_fraction_0.1_seed_7", 142, 2.0),
        ("refiner_fraction_0.25_seed_7", 359, 1.0),
        ("plain_vit_fraction_0.25_seed_7", 359, 1.0),
    ]:
        result = results[key]
        assert result["status"] == "ok", result.get("traceback")
        assert result["train_images"] == train_images
        assert result["optimizer_steps"] == 4
        assert result["epochs"] == epochs
        assert [point["step"] for point in result["history"]] == [4]  # once per whole epoch
        assert 0 <= result["best_acc1"] == result["final_acc1"] <= 1
        data = result["config"]["data"]["init_args"]
        assert data["train_fraction"] == result["fraction"] and data["img_size"] == 16
        assert result["config"]["seed_everything"] == 7
        assert not (Path(result["run_dir"]) / "checkpoints").exists()  # removed once recorded
        assert (Path(result["run_dir"]) / "config.yaml").is_file()
    kwargs = results["plain_vit_fraction_0.25_seed_7"]["config"]["model"]["init_args"]
    assert kwargs["model_kwargs"] == {"depth": 2, "refiner": False}

    report = json.loads((out / "data_efficiency.json").read_text())
    cell = next(
        row for row in report["summary"] if row["model"] == "refiner" and row["fraction"] == 0.25
    )
    assert cell["runs"] == 1 and cell["failed"] == 0 and cell["final_acc1_std"] is None
    assert cell["final_acc1_mean"] == results["refiner_fraction_0.25_seed_7"]["final_acc1"]
    assert report["settings"]["fraction_plan"]["0.1"] == {
        "train_images": 142,
        "epochs": 2.0,
        "optimizer_steps": 4,
    }
    table = (out / "data_efficiency.md").read_text()
    assert "| model | 10% (142 img) | 25% (359 img) |" in table
    assert "| plain_vit | — (1 failed) |" in table
    assert "failed: `plain_vit_fraction_0.1_seed_7`: RuntimeError: out of memory" in table
    with Image.open(out / "data_efficiency.png") as picture:
        assert picture.format == "PNG" and min(picture.size) > 300

    # Rerun: every run has a result, so nothing trains (the failed one is kept as failed).
    monkeypatch.setattr(data_efficiency, "fit_run", real_fit_run)
    stamps = {path: path.stat().st_mtime_ns for path in (out / "results").iterdir()}
    main(args)
    printed = capsys.readouterr().out
    assert printed.count("kept from before") == 4 and "training ..." not in printed
    assert {path: path.stat().st_mtime_ns for path in (out / "results").iterdir()} == stamps

    # An interrupted grid (a run without a result) trains just that run; --retry_failed
    # also trains the failed one again.
    (out / "results" / "refiner_fraction_0.1_seed_7.json").unlink()
    main(["--retry_failed", "true", *args])
    printed = capsys.readouterr().out
    assert printed.count(": training ...") == 2
    assert "[1/4] refiner fraction 0.1 seed 7: training ..." in printed
    assert "[2/4] plain_vit fraction 0.1 seed 7: training ..." in printed
    results = read_results(out)
    assert all(result["status"] == "ok" for result in results.values())
    table = (out / "data_efficiency.md").read_text()
    assert "(4 runs, 0 failed)" in table and "- failed:" not in table

    # The report again from the JSON alone, elsewhere.
    elsewhere = tmp_path / "copy"
    main(["--report_from", str(out / "data_efficiency.json"), "--out", str(elsewhere)])
    assert (elsewhere / "data_efficiency.md").read_text() == (
        out / "data_efficiency.md"
    ).read_text()
    assert (elsewhere / "data_efficiency.png").is_file()

    # Other settings into the same folder would mislabel the kept results: refused.
    with pytest.raises(SystemExit) as exit_:
        main([*args[: args.index("--epochs")], "--epochs", "2", *args[args.index("--") :]])
    assert exit_.value.code == 2
    assert "holds a result for refiner_fraction_0.1_seed_7 from other settings" in (
        capsys.readouterr().err
    )


def test_steps_per_epoch_counts_what_the_train_loader_runs():
    steps = data_efficiency.steps_per_epoch
    assert steps(1437, 64, 1, 1, None) == 22  # the last, incomplete batch is dropped
    assert steps(1437, 64, 2, 1, None) == 11  # each device gets ceil(1437 / 2) images
    assert steps(1437, 64, 1, 4, None) == 6  # accumulation: 22 batches, 6 optimizer steps
    assert steps(1437, 64, 1, 1, 5) == 5 and steps(1437, 64, 1, 1, 0.5) == 11
    assert steps(50, 64, 1, 1, None) == 0


def test_tables_show_mean_and_sample_std():
    assert data_efficiency.mean_std([0.9, 0.95, 1.0]) == pytest.approx((0.95, 0.05))
    assert data_efficiency.mean_std([0.9]) == (0.9, None)
    assert data_efficiency.percent(0.95, 0.05) == "95.00 ± 5.00"
    assert data_efficiency.percent(None, None) == "—"


@pytest.mark.parametrize("budget", ["steps", "epochs"])
def test_budgets_plan_steps_epochs_and_warmup(budget, tmp_path):
    # 4 batches of 64 an epoch of the whole split (limit_train_batches); 10% has 2 a epoch
    runs, settings = data_efficiency.plan_grid(
        CONFIG, TINY_FIT, tmp_path, ["refiner", "conv_only"], [0.1, 1.0], 2, None, 3, budget
    )
    assert settings["seeds"] == [42, 43]  # from the config's seed_everything
    plan = settings["fraction_plan"]
    if budget == "steps":  # 3 whole-split epochs = 12 steps for every fraction
        assert plan == {
            "0.1": {"train_images": 142, "epochs": 6.0, "optimizer_steps": 12},
            "1": {"train_images": 1437, "epochs": 3.0, "optimizer_steps": 12},
        }
    else:
        assert plan == {
            "0.1": {"train_images": 142, "epochs": 3, "optimizer_steps": 6},
            "1": {"train_images": 1437, "epochs": 3, "optimizer_steps": 12},
        }
    assert [run["key"] for run in runs] == [
        f"{model}_fraction_{fraction}_seed_{seed}"
        for fraction in ("0.1", "1")
        for model in ("refiner", "conv_only")
        for seed in (42, 43)
    ]
    args = runs[2]["args"]  # conv_only, 10%, seed 42
    option = dict(zip(args[::2], args[1::2], strict=True))
    assert option["--data.init_args.train_fraction"] == "0.1"
    assert option["--seed_everything"] == "42"
    assert json.loads(option["--model.init_args.model_kwargs"]) == {
        "depth": 2,
        "refiner_expansion": 1,
    }
    if budget == "steps":
        assert option["--trainer.max_steps"] == "12" and option["--trainer.max_epochs"] == "6"
        assert option["--trainer.val_check_interval"] == "4"  # once per whole-split epoch
        assert option["--model.init_args.warmup_epochs"] == "2.0"  # 1 whole epoch = 4 steps
    else:
        assert option["--trainer.max_epochs"] == "3" and option["--trainer.max_steps"] == "-1"
