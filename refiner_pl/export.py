"""Export a trained network for inference and check the export against PyTorch.

    python -m refiner_pl.export --ckpt_path runs/quickstart/version_0/checkpoints/last.ckpt
    python -m refiner_pl.export --ckpt_path refiner_s.pth --format exported_program

``--ckpt_path`` takes a Lightning checkpoint of this project, a Refiner-ViT release file or a
model saved with `refiner_pl.models.save_model`. The network (``ImageClassifier.model``, in
eval mode, so the refiners run with their BatchNorms folded into the convolutions) maps
normalised images ``(batch, channels, height, width)`` to class logits ``(batch,
num_classes)``; the batch size is dynamic, the image size is the one the model was trained at.

Formats:

* ``onnx`` (default): ``torch.onnx.export``'s torch.export-based exporter; checked with
  onnxruntime. Needs the optional extra: ``pip install -e '.[export]'``.
* ``exported_program``: a ``torch.export`` ExportedProgram saved with ``torch.export.save``
  (load it with ``torch.export.load(path).module()``).
* ``torchscript``: ``torch.jit.trace`` (``torch.jit.script`` cannot compile the model), for
  runtimes that only read TorchScript; PyTorch has deprecated TorchScript.

After writing the file the command runs a random batch of another size than the one it
traced with through the export and through PyTorch and reports the largest absolute
difference of the logits; above ``--atol`` it deletes the file and fails.
"""

from __future__ import annotations

import importlib
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from jsonargparse import auto_cli
from lightning.pytorch.cli import LightningCLI
from timm.data import ImageNetInfo, resolve_model_data_config
from torch import nn

from refiner_pl import runs
from refiner_pl.checkpoint_io import read_checkpoint, verify_digest
from refiner_pl.cli import RefinerCLI
from refiner_pl.errors import UserInputError, reporting_user_errors
from refiner_pl.models import from_official_checkpoint
from refiner_pl.module import network_from_checkpoint
from refiner_pl.parser import RefinerArgumentParser
from refiner_pl.runs import CKPT_ALIASES

Format = Literal["onnx", "exported_program", "torchscript"]
FORMATS: tuple[str, ...] = Format.__args__  # type: ignore[attr-defined]
SUFFIXES = {"onnx": ".onnx", "exported_program": ".pt2", "torchscript": ".torchscript.pt"}

TRACE_BATCH = 2
"""Batch size of the example input the export traces with (1 would fix the batch size)."""
CHECK_BATCH = 3
"""Batch size of the check after export: another size proves the batch dimension is dynamic."""
MIN_OPSET = 18
"""Lowest opset the torch.export-based ONNX exporter produces (lower ones are not converted)."""
ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")
PROTOBUF_LIMIT = 2**31
"""ONNX files are protobufs: larger models keep their weights in an external data file."""


class ExportMismatchError(RuntimeError):
    """The exported file computes other logits than the PyTorch network."""


class LoadedNetwork(NamedTuple):
    """A network ready to export and its input size (C, H, W); ``ema``: whether it holds a
    Lightning checkpoint's EMA weights (None: a release or saved-model file)."""

    network: nn.Module
    input_size: tuple[int, int, int]
    ema: bool | None
    metadata: dict[str, str]

    @property
    def weights(self) -> str:
        return {True: "EMA weights", False: "raw weights", None: "weights"}[self.ema]


def load_network(ckpt_path: str | Path, ema: bool | None = None) -> LoadedNetwork:
    """The network of a Lightning checkpoint, release file or saved model, in eval mode.

    Args:
        ckpt_path: the file to load.
        ema: for Lightning checkpoints, export the EMA weights (True), the raw weights
            (False), or the EMA weights when the checkpoint has them (None). Release files
            always give their EMA weights when they hold both.
    """
    # one clear error for a missing or unreadable file; the digest is checked once, below
    checkpoint = read_checkpoint(ckpt_path, verify=False)
    if "pytorch-lightning_version" not in checkpoint:
        if ema is not None:
            raise UserInputError(
                f"--ema chooses between the raw and the EMA weights of a Lightning checkpoint, "
                f"and {ckpt_path} is a release or saved-model file (it gives its EMA weights "
                "when it has both): leave --ema out"
            )
        verify_digest(checkpoint, ckpt_path)
        network = from_official_checkpoint(checkpoint)
        size = _input_size(network)
        return LoadedNetwork(_prepare(network), size, None, _metadata(network, size, {}))

    trained = network_from_checkpoint(ckpt_path, ema)
    network = trained.network
    size = _input_size(network, trained.hparams.get("img_size"))
    return LoadedNetwork(
        _prepare(network), size, trained.ema, _metadata(network, size, trained.deployment)
    )


def _metadata(
    network: nn.Module, input_size: tuple[int, int, int], deployment: dict
) -> dict[str, str]:
    """What a deployer needs besides the graph, as strings (ONNX metadata_props): class names,
    input size, normalisation and resize, from the checkpoint where it recorded them, else
    from the model's pretrained config (ImageNet-1k names for 1000 classes)."""
    data = resolve_model_data_config(network)
    num_classes = getattr(network, "num_classes", None)
    names = deployment.get("class_names")
    if names is None and num_classes == 1000:
        names = list(ImageNetInfo().label_names())
    fields = {
        "class_names": names,
        "num_classes": num_classes,
        "input_size": list(input_size),
        "mean": deployment.get("mean", list(data["mean"])),
        "std": deployment.get("std", list(data["std"])),
        "interpolation": deployment.get("interpolation", data["interpolation"]),
        "crop_pct": deployment.get("crop_pct", data["crop_pct"]),
        "input_layout": "NCHW, RGB, float32 in [0, 1] then (x - mean) / std",
    }
    return {key: json.dumps(value) for key, value in fields.items() if value is not None}


def _add_onnx_metadata(path: Path, metadata: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def _prepare(network: nn.Module) -> nn.Module:
    """Eval mode (folded BatchNorms, no dropout) and no activation checkpointing to trace."""
    if hasattr(network, "set_grad_checkpointing"):
        network.set_grad_checkpointing(False)
    if hasattr(network, "set_refiner_checkpointing"):
        network.set_refiner_checkpointing(False)
    return network.eval().requires_grad_(False)


def _input_size(network: nn.Module, img_size: int | None = None) -> tuple[int, int, int]:
    """(channels, height, width) the network was built for; ``img_size`` wins if given."""
    model_args = getattr(network, "model_args", None)  # RefinerViT records its own
    if isinstance(model_args, dict) and "img_size" in model_args:
        height, width = model_args["img_size"]
        channels = model_args["in_chans"]
    else:  # any other timm model
        channels, height, width = resolve_model_data_config(network)["input_size"]
    if img_size is not None:
        height = width = img_size
    return int(channels), int(height), int(width)


def _example(batch: int, input_size: tuple[int, int, int], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *input_size, generator=generator)


def require_onnx() -> None:
    """Fails with the install command when the optional ``[export]`` extra is missing."""
    missing = []
    for name in ONNX_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserInputError(
            f"ONNX export needs {', '.join(missing)} (the optional extra): "
            "pip install -e '.[export]'"
        )


def _check_opset(opset: int | None) -> None:
    if opset is None:
        return
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise UserInputError(
            f"--opset {opset} is not available: the exporter writes opsets {MIN_OPSET} to "
            f"{newest}; pick one in that range or leave --opset out"
        )


def export_network(
    network: nn.Module,
    out: str | Path,
    format: Format = "onnx",
    input_size: tuple[int, int, int] = (3, 224, 224),
    opset: int | None = None,
) -> Path:
    """Writes ``network`` (in eval mode) to ``out`` with a dynamic batch dimension."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    example = _example(TRACE_BATCH, input_size, seed=0)
    batch = torch.export.Dim("batch", min=1)
    if format == "onnx":
        require_onnx()
        _check_opset(opset)
        size = sum(p.numel() * p.element_size() for p in network.parameters())
        torch.onnx.export(
            network,
            (example,),
            str(out),
            dynamo=True,  # the TorchScript-based exporter is deprecated
            dynamic_shapes=({0: batch},),
            input_names=["images"],
            output_names=["logits"],
            opset_version=opset,
            external_data=size >= PROTOBUF_LIMIT,  # one self-contained file when it fits
            verbose=False,
        )
    elif format == "exported_program":
        program = torch.export.export(network, (example,), dynamic_shapes=({0: batch},))
        torch.export.save(program, out)
    elif format == "torchscript":
        # no_grad: with autograd on, trace's own check fails on parameters that require
        # grad ("Graphs differed across invocations"); an export is inference anyway.
        with warnings.catch_warnings(), torch.no_grad():
            # Deprecation notices, and tracer notes on shape checks that the trace fixes to
            # the traced image size, which is the size the model is built for.
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(network, example)
        traced.save(str(out))
    else:
        raise UserInputError(f"unknown export format {format!r}: use one of {', '.join(FORMATS)}")
    return out


def run_export(path: str | Path, format: Format, images: torch.Tensor) -> torch.Tensor:
    """Runs the exported file on ``images`` with its own runtime; returns the logits."""
    if format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return torch.from_numpy(session.run(None, {name: images.numpy()})[0])
    if format == "exported_program":
        return torch.export.load(path).module()(images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        return torch.jit.load(str(path))(images)


@torch.no_grad()
def check_export(
    path: str | Path,
    network: nn.Module,
    format: Format,
    input_size: tuple[int, int, int],
    batch_size: int = CHECK_BATCH,
    atol: float = 1e-4,
) -> float:
    """Largest absolute logit difference between the export and ``network`` on a random
    batch; raises `ExportMismatchError` above ``atol``."""
    images = _example(batch_size, input_size, seed=1)
    expected = network(images)
    got = run_export(path, format, images)
    if got.shape != expected.shape:
        raise ExportMismatchError(
            f"{path} returns logits of shape {tuple(got.shape)} for a batch of {batch_size}, "
            f"PyTorch {tuple(expected.shape)}"
        )
    diff = (got - expected).abs().max().item()
    if not diff <= atol:  # also catches NaN
        raise ExportMismatchError(
            f"{path} differs from PyTorch by up to {diff:.3g} at batch size {batch_size} "
            f"(tolerance {atol:g})"
        )
    return diff


def export(
    ckpt_path: str,
    format: Format = "onnx",
    out: str | None = None,
    opset: int | None = None,
    ema: bool | None = None,
    atol: float = 1e-4,
    train_config: str | None = None,
) -> Path:
    """Export a checkpoint's network and check it against PyTorch.

    Args:
        ckpt_path: a Lightning checkpoint of this project, a Refiner-ViT release file, a
            model saved with refiner_pl.models.save_model, or ``best``/``last`` of the runs
            of ``--train_config`` (as ``cli.py validate --ckpt_path best`` picks them).
        format: onnx, exported_program (torch.export) or torchscript (torch.jit.trace).
        out: the file to write; default: next to the checkpoint, named after it, with
            ``-ema`` for EMA weights and the format's suffix (.onnx, .pt2, .torchscript.pt).
        opset: ONNX opset (18 or newer); default: the exporter's.
        ema: Lightning checkpoints: true exports the EMA weights, false the raw weights;
            default: the EMA weights when the checkpoint has them.
        atol: largest absolute logit difference accepted in the check after export.
        train_config: the ``cli.py`` config whose runs ``best``/``last`` choose from.
    """
    if ckpt_path in CKPT_ALIASES:
        ckpt_path = resolve_alias_of_config(ckpt_path, train_config)
    if format not in FORMATS:
        raise UserInputError(f"unknown export format {format!r}: use one of {', '.join(FORMATS)}")
    if not atol > 0:
        raise UserInputError(f"--atol must be > 0, got {atol}")
    source = Path(ckpt_path)
    if not source.is_file():
        raise UserInputError(f"checkpoint {ckpt_path!r} does not exist: check --ckpt_path")
    if out is not None and Path(out).resolve() == source.resolve():
        raise UserInputError(f"--out {out} would overwrite the checkpoint: choose another file")
    if out is not None and format == "exported_program" and not out.endswith(".pt2"):
        raise UserInputError(
            f"--out {out}: torch.export archives must end in .pt2 (torch.export.load expects "
            "it); name the file <name>.pt2"
        )
    if format == "onnx":  # before the checkpoint is read
        require_onnx()
        _check_opset(opset)
    elif opset is not None:
        raise UserInputError("--opset applies to ONNX only: drop it or use --format onnx")

    loaded = load_network(source, ema)
    if out is None:
        tag = "-ema" if loaded.ema else ""
        out = str(source.with_name(source.stem + tag + SUFFIXES[format]))
    path = export_network(loaded.network, out, format, loaded.input_size, opset)
    if format == "onnx":
        _add_onnx_metadata(path, loaded.metadata)
    try:
        diff = check_export(path, loaded.network, format, loaded.input_size, atol=atol)
    except ExportMismatchError as err:
        path.unlink(missing_ok=True)
        raise ExportMismatchError(f"{err}; deleted the file") from None
    runtime = "onnxruntime" if format == "onnx" else "the loaded file"
    print(
        f"exported the {loaded.weights} of {ckpt_path} to {path} ({format}, input "
        f"(batch, {', '.join(map(str, loaded.input_size))}), dynamic batch); {runtime} vs "
        f"PyTorch at batch size {CHECK_BATCH}: max abs diff {diff:.3g} (<= {atol:g})"
    )
    return path


def resolve_alias_of_config(alias: str, config: str | None) -> str:
    """``best``/``last`` of the runs of a ``cli.py`` config file, with cli.py's defaults."""
    if config is None:
        raise UserInputError(
            f"--ckpt_path {alias} picks among the runs of a training config: add "
            "--train_config (e.g. configs/quickstart.yaml) or pass a checkpoint file"
        )

    class Resolved(Exception):
        pass

    class AliasResolver(RefinerCLI):  # cli.py's parser and defaults; stops after parsing
        def parse_arguments(self, parser: Any, args: Any) -> None:
            LightningCLI.parse_arguments(self, parser, args)
            runs.resolve_ckpt_alias(self.config.validate, "validate")
            raise Resolved(str(self.config.validate.ckpt_path))

    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    try:
        AliasResolver(args=["validate", "--config", config, "--ckpt_path", alias])
    except Resolved as resolved:
        return str(resolved)
    raise AssertionError("unreachable: the resolver always raises")


def main(args: list[str] | None = None) -> None:
    """Entry point of ``python -m refiner_pl.export``: bad input is one ``error:`` line."""
    try:
        with reporting_user_errors():
            auto_cli(
                export,
                args=args,
                as_positional=False,
                parser_class=RefinerArgumentParser,  # one error line, as cli.py
                prog="python -m refiner_pl.export",
            )
    except ExportMismatchError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
