"""`python -m refiner_pl.export`: ONNX, torch.export and TorchScript files that compute what
PyTorch computes, at batch sizes other than the traced one."""

import runpy
import sys
from pathlib import Path

import pytest
import timm
import torch
from helpers import RELEASE_FIXTURE as RELEASE
from helpers import quiet_trainer
from torch.utils.data import DataLoader, TensorDataset

from refiner_pl.callbacks import EMA
from refiner_pl.checkpoint_io import load_ema_weights
from refiner_pl.export import (
    ONNX_MODULES,
    TRACE_BATCH,
    ExportMismatchError,
    check_export,
    export_network,
    main,
    run_export,
)
from refiner_pl.models import from_official_checkpoint
from refiner_pl.module import ImageClassifier

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-4
BATCHES = (1, 5)  # both differ from the traced batch
assert TRACE_BATCH not in BATCHES


@pytest.fixture
def onnx_extra():
    """The ``[export]`` extra, which ONNX needs; without it the ONNX tests are skipped."""
    for module in ONNX_MODULES:
        pytest.importorskip(module)
    return sys.modules["onnxruntime"]


def images(batch: int, seed: int = 7) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def max_diff(path: Path, format: str, network: torch.nn.Module, batch: int) -> float:
    x = images(batch)
    with torch.no_grad():
        return (run_export(path, format, x) - network(x)).abs().max().item()


def randomised_tiny() -> torch.nn.Module:
    """refiner_vit_tiny in eval mode with non-trivial BatchNorm statistics, so the folded
    refiners differ from a plain identity."""
    torch.manual_seed(0)
    network = timm.create_model("refiner_vit_tiny", num_classes=10)
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.normal_(1, 0.2)
    return network.eval()


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory) -> Path:
    """A Lightning checkpoint of refiner_vit_tiny after a few steps, with EMA weights."""
    torch.manual_seed(0)
    module = ImageClassifier(
        model_name="refiner_vit_tiny", num_classes=10, img_size=32, sched="none", lr=1e-2
    )
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    fit_and_save(module, path, max_steps=4, callbacks=[EMA(decay=0.5)])
    return path


def fit_and_save(module: ImageClassifier, path: Path, **trainer_args) -> None:
    data = TensorDataset(torch.randn(16, 3, 32, 32), torch.arange(16) % 10)
    trainer = quiet_trainer(limit_val_batches=0, **trainer_args)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is fastest (see the one_thread fixture)
    try:
        trainer.fit(module, DataLoader(data, batch_size=4))
    finally:
        torch.set_num_threads(threads)
    trainer.save_checkpoint(path)


def trained_network(ckpt: Path, ema: bool) -> torch.nn.Module:
    network = ImageClassifier.load_from_checkpoint(ckpt, map_location="cpu").model
    if ema:
        network.load_state_dict(load_ema_weights(ckpt))
    return network.eval()


# ------------------------------------------------------------------------------- ONNX
# slow: an ONNX export (~13 s); the EMA command test keeps ONNX in the fast set
@pytest.mark.slow
def test_onnx_of_the_tiny_model_matches_pytorch_at_two_batch_sizes(onnx_extra, tmp_path):
    network = randomised_tiny()
    path = export_network(network, tmp_path / "tiny.onnx", "onnx", (3, 32, 32))
    session = onnx_extra.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inputs,) = session.get_inputs()
    assert inputs.name == "images" and isinstance(inputs.shape[0], str)  # a symbolic batch
    assert inputs.shape[1:] == [3, 32, 32]
    for batch in BATCHES:
        x = images(batch)
        (logits,) = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            expected = network(x)
        assert logits.shape == (batch, 10)
        assert (torch.from_numpy(logits) - expected).abs().max().item() <= ATOL


def test_command_exports_the_ema_weights_of_a_trained_checkpoint(onnx_extra, trained_ckpt, capsys):
    main(["--ckpt_path", str(trained_ckpt)])
    path = trained_ckpt.with_name("tiny-ema.onnx")  # the default name says which weights
    assert str(path) in capsys.readouterr().out
    ema, raw = trained_network(trained_ckpt, ema=True), trained_network(trained_ckpt, ema=False)
    for batch in BATCHES:
        assert max_diff(path, "onnx", ema, batch) <= ATOL
    assert max_diff(path, "onnx", raw, 5) > 1e-3  # the EMA weights, not the raw ones


# slow: a second ONNX export of the trained checkpoint (torch.export + onnxruntime, ~14 s)
@pytest.mark.slow
def test_command_exports_the_raw_weights_when_asked(onnx_extra, trained_ckpt, tmp_path):
    out = tmp_path / "nested" / "raw.onnx"
    main(["--ckpt_path", str(trained_ckpt), "--ema", "false", "--out", str(out), "--opset", "18"])
    raw = trained_network(trained_ckpt, ema=False)
    for batch in BATCHES:
        assert max_diff(out, "onnx", raw, batch) <= ATOL


# slow: an ONNX export of the release fixture (~13 s)
@pytest.mark.slow
def test_release_checkpoint_exports(onnx_extra, tmp_path):
    out = tmp_path / "release.onnx"
    main(["--ckpt_path", str(RELEASE), "--out", str(out)])
    network = from_official_checkpoint(RELEASE)
    for batch in BATCHES:
        assert max_diff(out, "onnx", network, batch) <= ATOL


# ---------------------------------------------------------------- torch.export, TorchScript
@pytest.mark.parametrize(
    ("format", "suffix"),
    [
        pytest.param("exported_program", ".pt2", marks=pytest.mark.slow),  # torch.export: ~11 s
        ("torchscript", ".torchscript.pt"),
    ],
)
def test_other_formats_match_pytorch(trained_ckpt, format, suffix, capsys):
    main(["--ckpt_path", str(trained_ckpt), "--format", format])
    path = trained_ckpt.with_name("tiny-ema" + suffix)
    assert str(path) in capsys.readouterr().out
    network = trained_network(trained_ckpt, ema=True)
    for batch in BATCHES:
        assert max_diff(path, format, network, batch) <= ATOL


def test_check_catches_an_export_that_computes_something_else(tmp_path):
    network = randomised_tiny()
    path = export_network(network, tmp_path / "tiny.torchscript.pt", "torchscript", (3, 32, 32))
    assert check_export(path, network, "torchscript", (3, 32, 32)) <= ATOL
    with torch.no_grad():
        network.head.bias.add_(0.01)  # the PyTorch model moves on, the file does not
    with pytest.raises(ExportMismatchError, match="differs from PyTorch by up to 0.01"):
        check_export(path, network, "torchscript", (3, 32, 32))


# ------------------------------------------------------------------------------ bad input
def error_line(capsys, *args: str, status: int = 2) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    assert exit_.value.code == status
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--ckpt_path", str(RELEASE), "--format", "tflite"], "Got value: tflite"),
        (
            ["--ckpt_path", str(RELEASE), "--format", "torchscript", "--opset", "18"],
            "--opset applies to ONNX only",
        ),
        (
            ["--ckpt_path", str(RELEASE), "--format", "exported_program", "--out", "x.onnx"],
            "torch.export archives must end in .pt2",
        ),
    ],
)
def test_bad_input_is_one_error_line(capsys, args, expected):
    assert expected in error_line(capsys, *args)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--ckpt_path", "no/such.ckpt"], "checkpoint 'no/such.ckpt' does not exist"),
        (["--ckpt_path", str(RELEASE), "--opset", "12"], "--opset 12 is not available"),
        (["--ckpt_path", str(RELEASE), "--ema", "true"], "leave --ema out"),
        (["--ckpt_path", str(RELEASE), "--out", str(RELEASE)], "would overwrite the checkpoint"),
    ],
)
def test_bad_input_to_the_default_onnx_export_is_one_error_line(onnx_extra, capsys, args, expected):
    assert expected in error_line(capsys, *args)


def test_truncated_checkpoint(onnx_extra, tmp_path, capsys):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(RELEASE.read_bytes()[:5000])
    assert "the file is truncated, damaged or not a PyTorch checkpoint" in error_line(
        capsys, "--ckpt_path", str(truncated)
    )


def test_ema_true_without_ema_weights(onnx_extra, tmp_path, capsys):
    module = ImageClassifier(
        model_name="refiner_vit_tiny", num_classes=10, img_size=32, sched="none"
    )
    ckpt = tmp_path / "no_ema.ckpt"
    fit_and_save(module, ckpt, max_steps=1)
    line = error_line(capsys, "--ckpt_path", str(ckpt), "--ema", "true")
    assert "holds no EMA weights" in line
    assert not list(tmp_path.glob("*.onnx"))


@pytest.mark.filterwarnings("ignore:'refiner_pl.export' found in sys.modules:RuntimeWarning")
def test_module_entry_point_reports_one_line(onnx_extra, tmp_path, monkeypatch, capsys):
    # `python -m refiner_pl.export ...`, run as __main__ in this process
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["refiner_pl.export", "--ckpt_path", "missing.ckpt"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("refiner_pl.export", run_name="__main__")
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: checkpoint 'missing.ckpt' does not exist: check --ckpt_path"
    ]


def test_missing_extra_names_the_install_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    line = error_line(capsys, "--ckpt_path", str(RELEASE))
    assert "onnxruntime" in line and "pip install -e '.[export]'" in line
