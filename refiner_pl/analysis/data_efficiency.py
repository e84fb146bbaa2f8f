"""Data efficiency of the refiner: a grid of `fit` runs, a table, a learning-curve plot, JSON.

    python -m refiner_pl.analysis.data_efficiency --config configs/quickstart.yaml

trains every model of the grid on every share of the train split with every seed, one run
after another, in this process and through the same `RefinerCLI` as ``python cli.py fit``:

* **models:** ``refiner`` (the config's Refiner-ViT as it is), ``plain_vit`` (its twin of the
  same depth and width with the refiner off), ``expansion_only`` (the refiner with a 1x1
  "convolution", i.e. no spatial one) and ``conv_only`` (the refiner with expansion ratio 1);
* **fractions:** ``data.train_fraction``, a class-stratified share of the train split drawn
  from the run's seed; the val split stays whole;
* **seeds:** ``--seeds`` runs per cell, seeds ``first_seed, first_seed + 1, ...``.

``--budget steps`` (the default) gives every fraction the optimizer steps that ``--epochs``
epochs of the whole train split take: fewer images, more epochs. Warmup and cooldown are
stretched alike and validation runs every whole-split epoch's worth of steps, so every run
is scored equally often at the same points. ``--budget epochs`` trains every fraction for
``--epochs`` epochs (fewer steps for fewer images).

Arguments after ``--`` go to every run as they would to ``cli.py fit`` (e.g.
``-- --data.init_args.batch_size 32``). The output folder holds each run's TensorBoard logs
and resolved ``config.yaml`` (``runs/``), one result JSON per finished run (``results/``),
``data_efficiency.json`` (every run's final and best val top-1, its history and resolved
config, and the summary), ``data_efficiency.md`` (the tables) and ``data_efficiency.png``
(the learning curves). Rerunning the same command resumes: finished runs are kept, an
interrupted one continues from its last checkpoint. A run that fails is recorded with its
error and the grid goes on (``--retry_failed true`` runs it again). ``--report_from
data_efficiency.json`` rewrites the table and plot from a JSON without training.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer

from refiner_pl.cli import RefinerArgumentParser, RefinerCLI
from refiner_pl.data import ClassificationDataModule
from refiner_pl.data.base import stratified_subset
from refiner_pl.errors import UserInputError, find_user_error, reporting_user_errors, user_message

PROG = "python -m refiner_pl.analysis.data_efficiency"
REPORT = "data_efficiency"
MONITOR = "val/acc1"

# name -> (model_kwargs layered over the config's, what it is)
MODELS: dict[str, tuple[dict[str, Any], str]] = {
    "refiner": ({}, "Refiner-ViT as configured"),
    "plain_vit": ({"refiner": False}, "plain ViT: same depth and width, refiner off"),
    "expansion_only": ({"refiner_kernel_size": 1}, "refiner without spatial conv (kernel 1)"),
    "conv_only": ({"refiner_expansion": 1}, "refiner without head expansion (ratio 1)"),
}
DEFAULT_FRACTIONS = (0.1, 0.25, 0.5, 1.0)
Budget = Literal["steps", "epochs"]


def build_parser() -> RefinerArgumentParser:
    parser = RefinerArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config",
        type=str | None,
        default=None,
        help="complete fit config of a refiner_vit_* model, e.g. configs/quickstart.yaml",
    )
    parser.add_argument("--out", type=str, default="runs/data_efficiency", help="output folder")
    parser.add_argument(
        "--models", type=list[str], default=list(MODELS), help="of: " + ", ".join(MODELS)
    )
    parser.add_argument(
        "--fractions", type=list[float], default=list(DEFAULT_FRACTIONS), help="shares of train"
    )
    parser.add_argument("--seeds", type=int, default=3, help="runs per model and fraction")
    parser.add_argument(
        "--first_seed", type=int | None, default=None, help="default: the config's seed_everything"
    )
    parser.add_argument(
        "--epochs", type=int | None, default=None, help="default: the config's trainer.max_epochs"
    )
    parser.add_argument(
        "--budget",
        type=Budget,
        default="steps",
        help="steps: every fraction gets the steps of --epochs whole-split epochs; "
        "epochs: every fraction trains --epochs epochs",
    )
    parser.add_argument(
        "--threads", type=int | None, default=None, help="torch CPU threads (default: torch's)"
    )
    parser.add_argument(
        "--keep_checkpoints", type=bool, default=False, help="keep each finished run's checkpoints"
    )
    parser.add_argument("--retry_failed", type=bool, default=False, help="rerun failed runs")
    parser.add_argument(
        "--report_from",
        type=str | None,
        default=None,
        help="a data_efficiency.json: rewrite its table and plot into --out, train nothing",
    )
    return parser


# ------------------------------------------------------------------------------ one run
class ValidationHistory(Callback):
    """Every validation's ``val/acc1`` with its step; part of the checkpoint, so a resumed
    run keeps the scores from before the interruption."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        value = trainer.callback_metrics.get(MONITOR)
        if trainer.sanity_checking or value is None:
            return
        point = {"step": trainer.global_step, "epoch": trainer.current_epoch, "acc1": float(value)}
        self.history.append(point)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])


def fit_run(args: list[str]) -> dict[str, Any]:
    """Runs ``cli.py fit`` with `args` in this process; returns what the result records."""
    history = ValidationHistory()
    with quiet_args_warning():
        cli = RefinerCLI(args=["fit", *args], trainer_defaults={"callbacks": [history]})
    if not history.history:
        raise RuntimeError(f"the run never validated, so there is no {MONITOR} to record")
    scores = [point["acc1"] for point in history.history]
    dumped = cli._parser("fit").dump(cli.config["fit"], skip_none=False)
    trainer = cli.trainer
    batches = trainer.num_training_batches  # per epoch, as the fit loop ran them
    return {
        "final_acc1": scores[-1],
        "best_acc1": max(scores),
        "train_images": len(cli.datamodule.train_set),
        "optimizer_steps": trainer.global_step,
        "epochs": round(trainer.global_step * trainer.accumulate_grad_batches / batches, 2),
        "history": history.history,
        "run_dir": trainer.log_dir,
        "config": yaml.safe_load(dumped),
    }


@contextmanager
def quiet_args_warning() -> Iterator[None]:
    """Silences LightningCLI's warning that ``args`` is given while ``sys.argv`` holds this
    command's own options: the runs are meant to ignore those."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        yield


def describe_error(err: BaseException) -> str:
    """One line naming a failed run's error."""
    user_error = find_user_error(err)
    if user_error is not None:
        return f"error: {user_message(user_error)}"
    if isinstance(err, SystemExit):  # the argument parser already printed its error line
        return f"the run's arguments were rejected (exit status {err.code}; see its error line)"
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")


# ------------------------------------------------------------------------------ the grid
def run_key(model: str, fraction: float, seed: int) -> str:
    return f"{model}_fraction_{fraction:g}_seed_{seed}"


def steps_per_epoch(
    images: int, batch_size: int, world_size: int, accumulate: int, limit: int | float | None
) -> int:
    """Optimizer steps of one epoch as the train loader runs it (shards, last batch dropped)."""
    batches = math.ceil(images / world_size) // batch_size
    if isinstance(limit, int):
        batches = min(batches, limit)
    elif isinstance(limit, float):
        batches = int(batches * limit)
    return math.ceil(batches / accumulate)


def probe(config: str, fit_args: Sequence[str]) -> RefinerCLI:
    """The config as `fit` would read it, instantiated but not run: a bad config or option
    fails here, before any run starts."""
    args = ["--config", config, *fit_args, "--trainer.logger", "false"]
    with quiet_args_warning():
        return RefinerCLI(args=args, run=False, save_config_callback=None)


def plan_grid(
    config: str,
    fit_args: Sequence[str],
    out: Path,
    models: Sequence[str],
    fractions: Sequence[float],
    seeds: int,
    first_seed: int | None,
    epochs: int | None,
    budget: Budget,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every run's key and ``fit`` arguments, and the grid's settings; checks every input."""
    unknown = [name for name in models if name not in MODELS]
    if unknown or not models or len(set(models)) != len(models):
        raise UserInputError(
            f"--models {list(models)}: give distinct names out of {', '.join(MODELS)}"
        )
    if not fractions or len(set(fractions)) != len(fractions):
        raise UserInputError(f"--fractions {list(fractions)}: give distinct values, e.g. [0.1,1]")
    bad = [fraction for fraction in fractions if not 0 < fraction <= 1]
    if bad:
        raise UserInputError(f"--fractions {bad}: every share of the train split must be in (0, 1]")
    if seeds < 1:
        raise UserInputError(f"--seeds is {seeds}: give the number of runs per cell, >= 1")
    if not Path(config).is_file():
        raise UserInputError(f"--config {config!r} does not exist: check the path")

    cli = probe(config, fit_args)
    model_args = cli.config.model.init_args
    model_name = model_args.model_name
    base_kwargs = dict(model_args.get("model_kwargs") or {})
    if not str(model_name).startswith("refiner_vit") or base_kwargs.get("refiner") is False:
        raise UserInputError(
            f"the config's model is {model_name} with model_kwargs {base_kwargs}: the grid "
            "needs a Refiner-ViT with its refiner on (e.g. configs/quickstart.yaml)"
        )
    if first_seed is None:
        configured = cli.config.get("seed_everything")
        first_seed = configured if isinstance(configured, int) and configured is not True else 0
    if epochs is None:
        epochs = cli.config.trainer.get("max_epochs")
    if not isinstance(epochs, int) or epochs < 1:
        raise UserInputError(
            f"epochs is {epochs}: give --epochs (or trainer.max_epochs in the config), >= 1"
        )

    datamodule: ClassificationDataModule = cli.datamodule
    trainer, hp = cli.trainer, model_args
    datamodule.train_fraction = 1.0  # the grid's shares are of the whole split
    datamodule.setup("fit")
    whole = datamodule.train_set
    per_step = (datamodule.batch_size, trainer.world_size, trainer.accumulate_grad_batches)
    limit = trainer.limit_train_batches  # as the Trainer reads it (4.0 means 4 batches)
    whole_steps = steps_per_epoch(len(whole), *per_step, limit)
    budget_steps = epochs * whole_steps
    settings: dict[str, Any] = {
        "config": config,
        "fit_args": list(fit_args),
        "model_name": model_name,
        "model_kwargs": base_kwargs,
        "models": {name: MODELS[name][1] for name in models},
        "fractions": list(fractions),
        "seeds": list(range(first_seed, first_seed + seeds)),
        "epochs": epochs,
        "budget": budget,
        "train_images_whole": len(whole),
        "batch_size": datamodule.batch_size,
        "fraction_plan": {},
    }
    # Lightning's own output is turned down: the grid prints one line per run.
    quiet = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    runs = []
    for fraction in fractions:
        images = len(stratified_subset(whole, fraction, 0)) if fraction < 1 else len(whole)
        steps = steps_per_epoch(images, *per_step, limit)
        if steps < 1:
            raise UserInputError(
                f"fraction {fraction:g} leaves {images} train images, fewer than one batch of "
                f"{datamodule.batch_size} per device: raise the fraction or pass a smaller "
                "batch after --, e.g. -- --data.init_args.batch_size 16"
            )
        if budget == "steps":
            stretch = whole_steps / steps
            budget_args = [
                "--trainer.max_steps", str(budget_steps),
                "--trainer.max_epochs", str(math.ceil(budget_steps / steps)),
                "--trainer.check_val_every_n_epoch", "null",
                "--trainer.val_check_interval",
                str(whole_steps * trainer.accumulate_grad_batches),
                "--model.init_args.warmup_epochs", repr(hp.warmup_epochs * stretch),
                "--model.init_args.cooldown_epochs", str(round(hp.cooldown_epochs * stretch)),
            ]  # fmt: skip
            plan = {"epochs": budget_steps / steps, "optimizer_steps": budget_steps}
        else:
            budget_args = ["--trainer.max_epochs", str(epochs), "--trainer.max_steps", "-1"]
            plan = {"epochs": epochs, "optimizer_steps": epochs * steps}
        settings["fraction_plan"][f"{fraction:g}"] = {"train_images": images} | plan
        for name in models:
            kwargs = base_kwargs | MODELS[name][0]
            for seed in settings["seeds"]:
                key = run_key(name, fraction, seed)
                logger = {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {
                        "save_dir": str(out / "runs" / name),
                        "name": f"fraction_{fraction:g}",
                        "version": f"seed_{seed}",
                        "default_hp_metric": False,
                    },
                }
                args = [
                    "--config", config, *quiet, *fit_args, *budget_args,
                    "--seed_everything", str(seed),
                    "--data.init_args.train_fraction", repr(fraction),
                    "--model.init_args.model_kwargs", json.dumps(kwargs),
                    "--trainer.logger", json.dumps(logger),
                ]  # fmt: skip
                runs.append(
                    {"key": key, "model": name, "fraction": fraction, "seed": seed, "args": args}
                )
    del cli, datamodule, whole
    return runs, settings


def read_result(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:  # torn by a crash mid-write of an older version: redo it
        return None


def write_json(path: Path, data: Any) -> None:
    """Written whole or not at all: an interrupted grid never leaves half a result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(partial, path)


def check_resumable(runs: Sequence[dict[str, Any]], results_dir: Path) -> None:
    """A kept result must come from the same run arguments, else it would be mislabelled."""
    for run in runs:
        kept = read_result(results_dir / f"{run['key']}.json")
        if kept is not None and kept.get("args") != run["args"]:
            raise UserInputError(
                f"{results_dir} holds a result for {run['key']} from other settings (its "
                "arguments differ): pass another --out, or delete that folder to start over"
            )


def run_grid(
    config: str,
    out: str | Path,
    fit_args: Sequence[str] = (),
    models: Sequence[str] = tuple(MODELS),
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seeds: int = 3,
    first_seed: int | None = None,
    epochs: int | None = None,
    budget: Budget = "steps",
    keep_checkpoints: bool = False,
    retry_failed: bool = False,
) -> dict[str, Any]:
    """Trains every run that has no result yet, then writes and returns the report."""
    out = Path(out)
    started = time.perf_counter()
    runs, settings = plan_grid(
        config, fit_args, out, models, fractions, seeds, first_seed, epochs, budget
    )
    results_dir = out / "results"
    check_resumable(runs, results_dir)
    results = []
    for index, run in enumerate(runs, 1):
        label = (
            f"[{index:>{len(str(len(runs)))}}/{len(runs)}] {run['model']} "
            f"fraction {run['fraction']:g} seed {run['seed']}"
        )
        path = results_dir / f"{run['key']}.json"
        result = read_result(path)
        if result is not None and (result["status"] == "ok" or not retry_failed):
            print(f"{label}: kept from before ({summarise(result)})", flush=True)
            results.append(result)
            continue
        run_dir = (
            out / "runs" / run["model"] / f"fraction_{run['fraction']:g}" / f"seed_{run['seed']}"
        )
        if result is not None:  # a failed run tried again starts from scratch
            shutil.rmtree(run_dir, ignore_errors=True)
        print(f"{label}: training ...", flush=True)
        begun = time.perf_counter()
        result = {key: run[key] for key in ("key", "model", "fraction", "seed", "args")}
        try:
            result |= {"status": "ok"} | fit_run(run["args"])
        except (Exception, SystemExit) as err:  # recorded; the grid goes on
            result |= {
                "status": "failed",
                "error": describe_error(err),
                "traceback": traceback.format_exc(),
            }
        result["wall_s"] = round(time.perf_counter() - begun, 1)
        write_json(path, result)
        if result["status"] == "ok" and not keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        print(f"{label}: {summarise(result)}", flush=True)
        results.append(result)
        gc.collect()
    report = {
        "settings": settings,
        "wall_s_this_invocation": round(time.perf_counter() - started, 1),
        "wall_s_runs": round(sum(result["wall_s"] for result in results), 1),
        "summary": summarise_grid(results, settings),
        "runs": results,
    }
    write_report(report, out)
    return report


def summarise(result: dict[str, Any]) -> str:
    if result["status"] != "ok":
        return f"FAILED after {result['wall_s']:.0f} s, {result['error']}"
    return (
        f"final {100 * result['final_acc1']:.2f}%, best {100 * result['best_acc1']:.2f}% "
        f"({result['train_images']} images, {result['optimizer_steps']} steps, "
        f"{result['wall_s']:.0f} s)"
    )


# ---------------------------------------------------------------------------- the report
def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None where there are too few values)."""
    mean = statistics.fmean(values) if values else None
    return mean, statistics.stdev(values) if len(values) > 1 else None


def summarise_grid(results: Sequence[dict[str, Any]], settings: dict[str, Any]) -> list[dict]:
    """Per model and fraction: runs, failures, train images, final and best val top-1."""
    rows = []
    for model in settings["models"]:
        for fraction in settings["fractions"]:
            cell = [r for r in results if r["model"] == model and r["fraction"] == fraction]
            done = [r for r in cell if r["status"] == "ok"]
            final, final_std = mean_std([r["final_acc1"] for r in done])
            best, best_std = mean_std([r["best_acc1"] for r in done])
            rows.append(
                {
                    "model": model,
                    "fraction": fraction,
                    "train_images": settings["fraction_plan"][f"{fraction:g}"]["train_images"],
                    "runs": len(done),
                    "failed": len(cell) - len(done),
                    "final_acc1_mean": final,
                    "final_acc1_std": final_std,
                    "best_acc1_mean": best,
                    "best_acc1_std": best_std,
                }
            )
    return rows


def percent(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "—"
    return f"{100 * mean:.2f}" + ("" if std is None else f" ± {100 * std:.2f}")


def markdown_table(report: dict[str, Any], measure: str) -> str:
    """Models down, fractions across: mean ± std of ``measure`` (final or best) in percent."""
    settings, rows = report["settings"], report["summary"]
    plan = settings["fraction_plan"]
    header = ["model"] + [
        f"{100 * f:g}% ({plan[f'{f:g}']['train_images']} img)" for f in settings["fractions"]
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in settings["models"]:
        cells = [model]
        for fraction in settings["fractions"]:
            row = next(r for r in rows if r["model"] == model and r["fraction"] == fraction)
            text = percent(row[f"{measure}_acc1_mean"], row[f"{measure}_acc1_std"])
            if row["failed"]:
                text += f" ({row['failed']} failed)"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(report: dict[str, Any]) -> str:
    settings = report["settings"]
    plan = settings["fraction_plan"]
    if settings["budget"] == "steps":
        steps = next(iter(plan.values()))["optimizer_steps"]
        budget = (
            f"every fraction trains {steps} optimizer steps, the steps of {settings['epochs']} "
            "epoch(s) of the whole train split ("
            + ", ".join(f"{100 * float(f):g}%: {p['epochs']:.1f} epochs" for f, p in plan.items())
            + "), validated every whole-split epoch's worth of steps"
        )
    else:
        budget = f"every fraction trains {settings['epochs']} epoch(s)"
    failed = [run for run in report["runs"] if run["status"] != "ok"]
    lines = [
        f"Config `{settings['config']}`"
        + (f" with `{' '.join(settings['fit_args'])}`" if settings["fit_args"] else "")
        + f"; model `{settings['model_name']}`; seeds {settings['seeds']}; {budget}. "
        f"Val top-1 (%) on the val split, mean ± sample std over seeds.",
        "",
        "Final (last validation):",
        "",
        markdown_table(report, "final"),
        "",
        "Best (highest validation of the run):",
        "",
        markdown_table(report, "best"),
        "",
        "Models: " + "; ".join(f"`{name}`: {text}" for name, text in settings["models"].items()),
        "",
        f"Wall time: {report['wall_s_runs'] / 60:.1f} min of training runs "
        f"({len(report['runs'])} runs, {len(failed)} failed).",
    ]
    lines += [f"- failed: `{run['key']}`: {run['error']}" for run in failed]
    return "\n".join(lines) + "\n"


def plot_learning_curves(report: dict[str, Any], path: Path) -> None:
    """Val top-1 against training images, one line per model, error bars one std."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    settings, rows = report["settings"], report["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained", sharey=True)
    for axis, measure in zip(axes, ("final", "best"), strict=True):
        for offset, model in enumerate(settings["models"]):
            points = [
                r for r in rows if r["model"] == model and r[f"{measure}_acc1_mean"] is not None
            ]
            # a small horizontal shift per model keeps overlapping error bars apart
            shift = 1 + 0.012 * (offset - (len(settings["models"]) - 1) / 2)
            axis.errorbar(
                [r["train_images"] * shift for r in points],
                [100 * r[f"{measure}_acc1_mean"] for r in points],
                yerr=[100 * (r[f"{measure}_acc1_std"] or 0) for r in points],
                marker="o",
                capsize=3,
                label=model,
            )
        axis.set_xscale("log")
        images = sorted({r["train_images"] for r in rows})
        axis.set_xticks(images, [str(n) for n in images])
        axis.minorticks_off()
        axis.set(
            title=f"{measure} val top-1 (mean ± std over {len(settings['seeds'])} seeds)",
            xlabel="training images",
        )
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("val top-1 (%)")
    axes[0].legend(loc="lower right")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{REPORT}.json", report)
    (out / f"{REPORT}.md").write_text(markdown_report(report))
    plot_learning_curves(report, out / f"{REPORT}.png")


def report_from(path: str, out: str | Path) -> dict[str, Any]:
    """Rewrites the table and plot of a saved ``data_efficiency.json`` into `out`."""
    source = Path(path)
    try:
        report = json.loads(source.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserInputError(
            f"--report_from {path!r} cannot be read as JSON ({type(err).__name__}): pass the "
            f"{REPORT}.json a grid wrote"
        ) from None
    if not isinstance(report, dict) or not {"settings", "summary", "runs"} <= set(report):
        raise UserInputError(f"--report_from {path!r} is not a {REPORT}.json of this command")
    out = Path(out)
    if (out / f"{REPORT}.json").resolve() != source.resolve():
        write_json(out / f"{REPORT}.json", report)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{REPORT}.md").write_text(markdown_report(report))
    plot_learning_curves(report, out / f"{REPORT}.png")
    return report


# -------------------------------------------------------------------------------- entry
def main(args: Sequence[str] | None = None) -> None:
    """Command-line entry; bad input ends with one ``error: ...`` line and exit status 2."""
    args = list(sys.argv[1:] if args is None else args)
    split = args.index("--") if "--" in args else len(args)
    own, fit_args = args[:split], args[split + 1 :]
    parsed = build_parser().parse_args(own)
    with reporting_user_errors():
        if parsed.threads is not None:
            if parsed.threads < 1:
                raise UserInputError(f"--threads is {parsed.threads}: give a count >= 1")
            torch.set_num_threads(parsed.threads)
        if parsed.report_from is not None:
            report_from(parsed.report_from, parsed.out)
        else:
            if parsed.config is None:
                raise UserInputError(
                    "no --config given: pass a fit config of a Refiner-ViT, e.g. "
                    "--config configs/quickstart.yaml"
                )
            run_grid(
                parsed.config,
                parsed.out,
                fit_args=fit_args,
                models=parsed.models,
                fractions=parsed.fractions,
                seeds=parsed.seeds,
                first_seed=parsed.first_seed,
                epochs=parsed.epochs,
                budget=parsed.budget,
                keep_checkpoints=parsed.keep_checkpoints,
                retry_failed=parsed.retry_failed,
            )
    out = Path(parsed.out)
    print(f"wrote {out / f'{REPORT}.md'}, {out / f'{REPORT}.png'} and {out / f'{REPORT}.json'}")


if __name__ == "__main__":
    main()
