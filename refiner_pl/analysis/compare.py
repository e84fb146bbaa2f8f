"""Compare the attention of trained checkpoints: a PNG report with plots per layer, and JSON.

    python -m refiner_pl.analysis.compare REFINER.ckpt PLAIN.ckpt --out reports/

Each checkpoint is a Lightning checkpoint of this project (``ImageClassifier`` with a
``refiner_vit_*`` model; the plain-ViT baseline is ``model_kwargs: {refiner: false}``). All
are measured on the same images: the first ``--num_images`` of the validation split of the
datamodule in ``--config`` (a config file with a ``data`` section, e.g.
``configs/quickstart.yaml``), by default the ``config.yaml`` of the first checkpoint's run
folder. ``attention_report.json`` holds every number of
`refiner_pl.analysis.attention.attention_report` per checkpoint; ``attention_report.png``
plots cross-head similarity, adjacent-layer similarity and attention distance per layer, the
layer-by-layer similarity matrices and the class token's attention maps.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import ArgumentParser
from torch import Tensor

from refiner_pl.analysis.attention import (
    attention_grid_image,
    attention_report,
    class_token_attention,
    collect_attention_maps,
    series_maps,
)
from refiner_pl.data import ClassificationDataModule
from refiner_pl.errors import UserInputError, find_user_error, reporting_user_errors
from refiner_pl.module import network_from_checkpoint
from refiner_pl.parser import RefinerArgumentParser, one_line

PROG = "python -m refiner_pl.analysis.compare"
REPORT = "attention_report"


def build_parser() -> RefinerArgumentParser:
    parser = RefinerArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="Lightning checkpoints (.ckpt) to compare")
    parser.add_argument(
        "--config",
        type=str | None,
        default=None,
        help="config file whose `data` section gives the images (default: the config.yaml "
        "of the first checkpoint's run folder)",
    )
    parser.add_argument("--names", nargs="+", default=None, help="one label per checkpoint")
    parser.add_argument("--num_images", type=int, default=64, help="validation images to use")
    parser.add_argument("--batch_size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--display", type=int, default=2, help="images in the attention maps")
    parser.add_argument("--ema", type=bool, default=False, help="use the checkpoints' EMA weights")
    parser.add_argument("--out", type=str, default=".", help="folder for the PNG and JSON")
    return parser


# ---------------------------------------------------------------------------- inputs
def load_network(path: str, ema: bool = False) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The eval-mode network of a Lightning checkpoint and its hyperparameters."""
    trained = network_from_checkpoint(path, ema)
    if not hasattr(trained.network, "forward_attention_maps"):
        raise UserInputError(
            f"{path} holds a {trained.hparams.get('model_name')} model, which does not expose "
            "attention maps: compare needs refiner_vit_* checkpoints (model_kwargs "
            "{refiner: false} is the plain-ViT baseline)"
        )
    return trained.network, trained.hparams


def load_datamodule(config: str | None, first_checkpoint: str) -> ClassificationDataModule:
    """The datamodule of the ``data`` section of ``config`` (or of the checkpoint's run)."""
    if config is None:
        config = str(Path(first_checkpoint).resolve().parent.parent / "config.yaml")
        if not Path(config).is_file():
            raise UserInputError(
                f"no --config given and {config} (the run's config) does not exist: pass "
                "--config with the data the checkpoints were trained on, e.g. "
                "configs/quickstart.yaml"
            )
    path = Path(config)
    if not path.is_file():
        raise UserInputError(f"config {config!r} does not exist: check the path")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        reason = one_line(str(err))
        raise UserInputError(f"config {config!r} is not valid YAML ({reason})") from None
    if not isinstance(loaded, dict) or not loaded.get("data"):
        raise UserInputError(
            f"config {config!r} has no `data` section: pass a complete config such as "
            "configs/quickstart.yaml"
        )
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(ClassificationDataModule, "data", required=True)
    try:
        return parser.instantiate(parser.parse_object({"data": loaded["data"]})).data
    except Exception as err:
        user_error = find_user_error(err)
        reason = str(user_error) if user_error else one_line(str(err))
        raise UserInputError(f"config {config!r}: {reason}") from None


def validation_batches(
    datamodule: ClassificationDataModule, num_images: int, batch_size: int
) -> list[Tensor]:
    """The first ``num_images`` validation images, in batches of ``batch_size``."""
    datamodule.setup("validate")
    collected: list[Tensor] = []
    held = 0
    for images, _ in datamodule.val_dataloader():
        collected.append(images[: num_images - held])
        held += len(collected[-1])
        if held >= num_images:
            break
    return list(torch.cat(collected).split(batch_size)) if collected else []


def default_names(
    hparams: Sequence[dict[str, Any]], networks: Sequence[torch.nn.Module]
) -> list[str]:
    """``model_name``, marked ``(refiner off)`` where no block refines; repeats numbered."""
    names = []
    for params, network in zip(hparams, networks, strict=True):
        refines = any(kind != "plain" for kind in getattr(network, "block_types", []))
        names.append(f"{params.get('model_name')}{'' if refines else ' (refiner off)'}")
    return [name if names.count(name) == 1 else f"{name} #{i}" for i, name in enumerate(names)]


# ---------------------------------------------------------------------------- report
def applied_class_maps(network: torch.nn.Module, images: Tensor) -> Tensor:
    """The class-token picture of the maps each block applies (refined where it refines)."""
    maps, grid = collect_attention_maps(network, images)
    series = series_maps(maps)
    applied = series["refined"] if series["refined"] is not None else series["raw"]
    return attention_grid_image(images, class_token_attention(applied, grid), tile=48)


def plot_report(models: list[dict[str, Any]], pictures: list[Tensor], path: Path) -> None:
    """Writes the PNG: line plots per layer, similarity matrices, class-token maps."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    count = len(models)
    heights = [4, 4] + ([2.6 * count] if pictures else [])
    fig = plt.figure(figsize=(15, sum(heights) + 0.5), layout="constrained")
    top, middle, *bottom = fig.subfigures(len(heights), 1, height_ratios=heights)
    lines = top.subplots(1, 3)
    panels = [
        ("head_similarity", "cross-head similarity", "layer"),
        ("adjacent_layer_similarity", "similarity of layer l and l+1", "layer l"),
        ("attention_distance", "mean attention distance (patches)", "layer"),
    ]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, (key, title, xlabel) in zip(lines, panels, strict=True):
        for index, model in enumerate(models):
            for series, style in (("raw", "--o"), ("refined", "-s")):
                if model[series] is None:
                    continue
                values = model[series][key]
                axis.plot(
                    range(len(values)),
                    values,
                    style,
                    color=colours[index % len(colours)],
                    label=f"{model['name']}: {series}",
                )
        axis.set(title=title, xlabel=xlabel)
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.grid(alpha=0.3)
    lines[0].legend(fontsize="small", loc="best")
    middle.suptitle("cross-layer similarity of the maps each block applies (head-averaged)")
    for axis, model in zip(middle.subplots(1, count, squeeze=False)[0], models, strict=True):
        series = model["refined"] if model["refined"] is not None else model["raw"]
        matrix = series["layer_similarity"]
        # refined maps are signed, so their similarities can be negative
        image = axis.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r")
        if len(matrix) <= 12:  # numbers stay readable
            for row, values in enumerate(matrix):
                for col, value in enumerate(values):
                    colour = "w" if abs(value) > 0.6 else "k"
                    axis.text(col, row, f"{value:.2f}", ha="center", va="center", color=colour)
        axis.set(title=model["name"], xlabel="layer", ylabel="layer")
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.yaxis.get_major_locator().set_params(integer=True)
        middle.colorbar(image, ax=axis, shrink=0.8)
    if pictures:
        bottom[0].suptitle("class-token attention of the applied maps: input, then layer 0, 1, ...")
        axes = bottom[0].subplots(count, 1, squeeze=False)[:, 0]
        for axis, model, picture in zip(axes, models, pictures, strict=True):
            axis.imshow(picture.permute(1, 2, 0).numpy())
            axis.set_title(model["name"], fontsize="medium")
            axis.axis("off")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(
    checkpoints: Sequence[str],
    out: str | Path,
    config: str | None = None,
    names: Sequence[str] | None = None,
    num_images: int = 64,
    batch_size: int = 32,
    display: int = 2,
    ema: bool = False,
) -> dict[str, Any]:
    """Measures every checkpoint on the same images; writes and returns the report."""
    for name, value in (("num_images", num_images), ("batch_size", batch_size)):
        if value < 1:
            raise UserInputError(f"--{name} is {value}: use a whole number >= 1")
    if not 0 <= display <= num_images:
        raise UserInputError(f"--display is {display}: use 0 to --num_images ({num_images})")
    if names is not None and len(names) != len(checkpoints):
        raise UserInputError(
            f"--names gives {len(names)} labels for {len(checkpoints)} checkpoints: give one each"
        )
    for path in checkpoints:  # every path before any is loaded: a typo fails fast
        if not Path(path).is_file():
            raise UserInputError(f"checkpoint {path!r} does not exist: check the path")
    loaded = [load_network(path, ema) for path in checkpoints]
    datamodule = load_datamodule(config, checkpoints[0])
    networks = [network for network, _ in loaded]
    names = list(names) if names else default_names([h for _, h in loaded], networks)

    batches = validation_batches(datamodule, num_images, batch_size)
    if not batches:
        raise UserInputError(f"the validation split of {type(datamodule).__name__} is empty")
    models = [
        {"name": name, "checkpoint": str(path), "model_name": hparams.get("model_name")}
        | attention_report(network, batches)
        for name, path, (network, hparams) in zip(names, checkpoints, loaded, strict=True)
    ]
    report = {
        "data": f"{type(datamodule).__name__}, first {models[0]['images']} validation images",
        "weights": "ema" if ema else "raw",
        "models": models,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{REPORT}.json").write_text(json.dumps(report, indent=1) + "\n")
    shown = torch.cat(batches)[:display]
    pictures = [applied_class_maps(network, shown) for network in networks] if display else []
    plot_report(models, pictures, out / f"{REPORT}.png")
    return report


def main(args: Sequence[str] | None = None) -> None:
    """Command-line entry; bad input ends with one ``error: ...`` line and exit status 2."""
    parsed = build_parser().parse_args(args)
    with reporting_user_errors():
        compare(
            parsed.checkpoints,
            parsed.out,
            config=parsed.config,
            names=parsed.names,
            num_images=parsed.num_images,
            batch_size=parsed.batch_size,
            display=parsed.display,
            ema=parsed.ema,
        )
    out = Path(parsed.out)
    print(f"wrote {out / f'{REPORT}.png'} and {out / f'{REPORT}.json'}")


if __name__ == "__main__":
    main()
