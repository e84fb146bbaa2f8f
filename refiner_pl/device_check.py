"""One prepared run of every GPU check: ``scripts/device_check.sh OUT [--cpu-smoke]``.

GPU mode (one CUDA device) checks correctness (the release fixture, autocast logits, the fused
CPU refiner never taken on CUDA, torch.compile against eager, `cli.py fit` in 16-mixed and
bf16-mixed, ``--ckpt_path last`` resume), measures throughput and memory with
``python -m refiner_pl.benchmark throughput``, and fits under DDP and FSDP on the one GPU.
``--cpu-smoke`` runs the same functions on the CPU with tiny sizes, so the GPU run cannot fail
on a typo; `Profile` holds everything that differs between the two.

Each check passes or fails with its numbers; a failing check does not stop the others. After
every check ``OUT/device_check.json`` and ``OUT/device_check.md`` are rewritten, so a run cut
short keeps what it measured. Exit status: 0 all passed, 1 a check failed (or a required one
did not run), 2 a bad argument.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import faulthandler
import gc
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from refiner_pl.errors import UserInputError, reporting_user_errors

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "official_refiner_tiny.pt"
CONFIGS = REPO / "configs"

# Autocast logits against fp32, as max |difference| / max |fp32 logit| over a fixed batch.
# Train mode (batch statistics) is looser: the refiner's BatchNorms normalise the attention
# map's small deviations from uniform, so bf16 rounding of the map is amplified (measured on
# CPU, refiner_vit_s at 224 px, random init: eval 0.8% / 0.08%, train 10.6% / 1.4% for
# bf16 / fp16; the plain-ViT twin 0.6% in train mode).
AUTOCAST_TOLERANCE = {
    ("eval", "bf16"): 0.03,
    ("eval", "fp16"): 0.005,
    ("train", "bf16"): 0.2,
    ("train", "fp16"): 0.04,
}
FIXTURE_ATOL = 1e-5  # against the release's own outputs: eval in fp32, train mode in fp64
# Train mode normalises by a 4-image batch's statistics: the release's own fp32 outputs are
# 8.5e-6 from the exact values, so fp32 on both sides agrees within twice that.
TRAIN_FP32_ATOL = 2e-5
CHANNELS_LAST_ATOL = 5e-5  # the opt-in channels-last refiner reorders float sums
COMPILE_RTOL = 1e-3  # compiled against eager training-step loss, fp32, relative
RESUME_RTOL = 2e-2  # resumed against uninterrupted losses (GPU kernels are not deterministic)


# ------------------------------------------------------------------------------- profiles
@dataclass(frozen=True)
class Bench:
    """One ``python -m refiner_pl.benchmark throughput`` run."""

    label: str
    model: str
    baseline: str
    img_size: int
    batch_size: int
    checkpointing: str = "off"
    compile: bool = False
    budget_s: float = 30
    required: bool = True  # optional runs are skipped, not failed, when time runs short
    oom_is_a_finding: bool = False  # an out-of-memory answers the question asked


@dataclass(frozen=True)
class Profile:
    """Everything the GPU run and the CPU smoke do differently: sizes, device, precisions."""

    name: str
    device: str
    budget_s: float
    budgets: dict[str, float]  # seconds per check (benchmarks: Bench.budget_s)
    threads: int
    num_workers: int
    # generated ImageFolder: classes x images per class, written at image_px
    classes: int
    train_per_class: int
    val_per_class: int
    image_px: int
    # cli.py fit: model config, image size, batch, epochs (train_per_class*classes/batch steps)
    fit_model: str
    fit_img: int
    fit_batch: int
    fit_epochs: int
    fit_lr: float
    resume_stop_epoch: int
    precise_bn_batches: int | None  # batches the fits' precise BN recomputes on; None: off
    # autocast logits and the fused-path probe
    amp_model: str
    amp_img: int
    amp_batch: int
    # torch.compile against eager
    compile_model: str
    compile_img: int
    compile_batch: int
    compile_backend: str
    compile_depth: int | None  # fewer blocks: the same hand-off pattern, a quicker compile
    explain: tuple[str, ...]  # graph-break counts: train, train_refiner_ckpt, ..., eval
    # DDP and FSDP fits on one device
    ddp_model: str
    ddp_img: int
    ddp_batch: int
    sync_batchnorm: bool
    fsdp_model: str
    fsdp_img: int
    fsdp_batch: int
    fsdp_steps: int
    fsdp_strategy: str | None  # None: configs/trainer/fsdp_bf16.yaml's FSDPStrategy
    bench_precision: str
    bench_rounds: int
    bench_steps: int
    bench_compile_backend: str
    benchmarks: tuple[Bench, ...]
    substitutions: tuple[str, ...] = field(default=())

    @property
    def fit_steps_per_epoch(self) -> int:
        """Optimizer steps per epoch of the fits: the generated train images per batch."""
        return self.classes * self.train_per_class // self.fit_batch


# Budget of the GPU run on one H200 (16 cores), in seconds; the sum of the required steps
# plus start-up stays under 8 minutes, and optional compiled benchmarks fill what is left.
GPU_BUDGETS = {
    "environment": 5,
    "release_fixture": 10,
    "fused_cpu_path": 5,
    "autocast_logits": 12,
    "compile": 45,
    "fit_16_mixed": 25,
    "fit_bf16_mixed": 25,
    "resume_last": 30,
    "ddp_one_gpu": 35,
    "fsdp_one_gpu": 40,
}
GPU = Profile(
    name="gpu",
    device="cuda",
    budget_s=465,  # plus ~15 s of start-up: 8 minutes
    budgets=GPU_BUDGETS,
    threads=8,
    num_workers=6,
    classes=4,
    train_per_class=48,
    val_per_class=8,
    image_px=224,
    fit_model="refiner_vit_s",
    fit_img=224,
    fit_batch=32,
    fit_epochs=5,  # 6 steps per epoch: 30 steps
    fit_lr=1e-3,
    resume_stop_epoch=3,
    precise_bn_batches=4,
    amp_model="refiner_vit_s",
    amp_img=224,
    amp_batch=8,
    compile_model="refiner_vit_s",
    compile_img=224,
    compile_batch=16,
    compile_backend="inductor",
    compile_depth=4,
    explain=("train", "train_refiner_ckpt", "train_block_ckpt", "eval"),
    ddp_model="refiner_vit_s",
    ddp_img=224,
    ddp_batch=32,
    sync_batchnorm=True,
    fsdp_model="refiner_vit_l",
    fsdp_img=448,
    fsdp_batch=8,
    fsdp_steps=8,
    fsdp_strategy=None,
    bench_precision="bf16",
    bench_rounds=2,
    bench_steps=3,
    bench_compile_backend="inductor",
    benchmarks=(
        Bench("S 224", "refiner_vit_s", "deit_small_patch16_224", 224, 64, budget_s=15),
        Bench("M 224", "refiner_vit_m", "deit_base_patch16_224", 224, 64, budget_s=18),
        Bench("L 224", "refiner_vit_l", "deit_base_patch16_224", 224, 64, budget_s=20),
        Bench(
            "L 448 refiner ckpt",
            "refiner_vit_l",
            "deit_base_patch16_224",
            448,
            8,
            "refiner",
            budget_s=25,
        ),
        Bench(
            "L 448 block ckpt",
            "refiner_vit_l",
            "deit_base_patch16_224",
            448,
            8,
            "blocks",
            budget_s=25,
        ),
        # does L at 448 need checkpointing on 141 GB at the release's 8 per GPU?
        Bench(
            "L 448 no ckpt",
            "refiner_vit_l",
            "deit_base_patch16_224",
            448,
            8,
            "off",
            budget_s=20,
            oom_is_a_finding=True,
        ),
        # compiled: inductor compiles each model's train and eval graphs (1-3 min per run);
        # the optional ones run when time is left, or alone: --only NAME --budget SECONDS
        Bench(
            "S 224 compiled",
            "refiner_vit_s",
            "deit_small_patch16_224",
            224,
            64,
            compile=True,
            budget_s=100,
        ),
        Bench(
            "L 448 refiner ckpt compiled",
            "refiner_vit_l",
            "deit_base_patch16_224",
            448,
            8,
            "refiner",
            compile=True,
            budget_s=150,
            required=False,
        ),
        Bench(
            "M 224 compiled",
            "refiner_vit_m",
            "deit_base_patch16_224",
            224,
            64,
            compile=True,
            budget_s=120,
            required=False,
        ),
        Bench(
            "L 224 compiled",
            "refiner_vit_l",
            "deit_base_patch16_224",
            224,
            64,
            compile=True,
            budget_s=150,
            required=False,
        ),
        Bench(
            "L 448 block ckpt compiled",
            "refiner_vit_l",
            "deit_base_patch16_224",
            448,
            8,
            "blocks",
            compile=True,
            budget_s=150,
            required=False,
        ),
    ),
)

CPU_SMOKE = Profile(
    name="cpu-smoke",
    device="cpu",
    budget_s=600,  # a deadline for a stuck run, not the target (2-5 minutes on 2 cores)
    budgets={name: 60 for name in GPU_BUDGETS},
    threads=1,  # shared small CPUs: more threads only wait on each other
    num_workers=0,
    classes=4,
    train_per_class=12,  # 3 steps per epoch, 15 per fit: bf16 steps are slow on the CPU
    val_per_class=4,
    image_px=16,
    fit_model="refiner_vit_tiny",
    fit_img=16,
    fit_batch=16,
    fit_epochs=5,
    fit_lr=3e-3,
    resume_stop_epoch=3,
    precise_bn_batches=None,
    amp_model="refiner_vit_tiny",
    amp_img=16,
    amp_batch=4,
    compile_model="refiner_vit_tiny",
    compile_img=16,
    compile_batch=8,
    compile_backend="eager",
    compile_depth=None,
    explain=("train_refiner_ckpt",),
    ddp_model="refiner_vit_tiny",
    ddp_img=16,
    ddp_batch=16,
    sync_batchnorm=False,
    fsdp_model="refiner_vit_tiny",
    fsdp_img=16,
    fsdp_batch=8,
    fsdp_steps=3,
    fsdp_strategy="ddp",
    bench_precision="bf16",
    bench_rounds=1,
    bench_steps=1,
    bench_compile_backend="eager",
    benchmarks=(
        Bench(
            "tiny 16 refiner ckpt compiled",
            "refiner_vit_tiny",
            "deit_tiny_patch16_224",  # the same code path as DeiT-S, 6 s quicker here
            16,
            4,
            "refiner",
            compile=True,
            budget_s=60,
        ),
    ),
    substitutions=(
        "refiner_vit_tiny at 16 px (17 tokens) instead of S/M/L at 224-448 px, one thread "
        "(bf16 training on this CPU is ~6x slower than fp32)",
        "16-mixed: Lightning runs it as bf16-mixed on the CPU (fp16 autocast training is "
        "GPU-only); the autocast logit check does run fp16 on the CPU",
        "torch.compile with the eager backend: dynamo's tracing, no AOTAutograd or inductor "
        "code generation (minutes on 2 cores); graph breaks of the refiner-checkpointing "
        "variant only",
        "fits without precise BN (on this CPU it took ~30 s per validation of the tiny model)",
        "DDP on gloo without SyncBatchNorm (torch's SyncBatchNorm refuses CPU tensors)",
        "FSDP: Lightning's FSDPStrategy refuses the CPU, so that fit runs the same command "
        "with --trainer.strategy ddp",
        "benchmarks: one compiled run (refiner checkpointing), 1 step, no memory measurement",
        "the fused-path probe expects the fused refiner on the CPU in fp32 training (it must "
        "count calls there) and none under autocast",
    ),
)


# --------------------------------------------------------------------------------- results
@dataclass
class Result:
    name: str
    status: str  # pass / fail / skipped
    seconds: float
    budget_s: float
    criterion: str = ""
    numbers: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    required: bool = True


class CheckFailed(AssertionError):
    """A check ran but its numbers miss the criterion."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


@dataclass
class Run:
    """What the checks share: the profile, folders, the device and results handed on."""

    profile: Profile
    out: Path
    work: Path
    started: float
    deadline: float
    device: torch.device
    shared: dict[str, Any] = field(default_factory=dict)
    _data_dir: Path | None = None

    @property
    def data_dir(self) -> Path:
        if self._data_dir is None:
            p = self.profile
            self._data_dir = make_image_folder(
                self.work / "images", p.classes, p.train_per_class, p.val_per_class, p.image_px
            )
        return self._data_dir

    @property
    def runs_dir(self) -> Path:
        return self.work / "runs"

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


# ------------------------------------------------------------------------------ test data
def make_image_folder(
    root: Path, classes: int, train_per_class: int, val_per_class: int, size: int, seed: int = 0
) -> Path:
    """``train/<class>/*.png`` and ``val/<class>/*.jpg``: each class a colour under noise, so
    a short fit has something to learn."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(30, 226, size=(classes, 3))
    for split, count, ext in (("train", train_per_class, ".png"), ("val", val_per_class, ".jpg")):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                noise = rng.normal(0, 40, size=(size, size, 3))
                pixels = np.clip(palette[c] + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{c}_{i}{ext}")
    return root


# --------------------------------------------------------------------- fused refiner probe
@contextlib.contextmanager
def counting_refiner_paths() -> Iterator[Counter]:
    """Counts, per computation (``fused``, ``folded``, ``modules``), the refiner calls made
    while the block runs, as the model's dispatcher (`fast_refiner.refine`) picks them."""
    try:
        from refiner_pl.models import fast_refiner
    except ImportError:  # before the CPU kernels had a module of their own: fused calls only
        with _counting_fused_method() as paths:
            yield paths
        return
    original = fast_refiner.refine
    paths: Counter = Counter()

    def counted(attention, attn, *args, **kwargs):
        paths[fast_refiner.refine_path(attention, attn)] += 1
        return original(attention, attn, *args, **kwargs)

    fast_refiner.refine = counted
    try:
        yield paths
    finally:
        fast_refiner.refine = original


@contextlib.contextmanager
def _counting_fused_method() -> Iterator[Counter]:
    from refiner_pl.models.refiner_vit import RefinerAttention

    original = RefinerAttention._refine_fused
    paths: Counter = Counter()

    def counted(self, attn):
        paths["fused"] += 1
        return original(self, attn)

    RefinerAttention._refine_fused = counted
    try:
        yield paths
    finally:
        RefinerAttention._refine_fused = original


class FitProbe(L.Callback):
    """Records a fit for the device check: per-step losses, the strategy, BatchNorm kinds,
    fused-refiner calls and peak memory, written as JSON to ``path`` when training ends.
    ``stop_after_epochs`` ends the fit cleanly after that many epochs (a pre-empted run)."""

    def __init__(self, path: str, stop_after_epochs: int | None = None) -> None:
        self.path = path
        self.stop_after_epochs = stop_after_epochs
        self.losses: list[tuple[int, float]] = []
        self._step = 0
        self._counter: contextlib.AbstractContextManager | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._counter = counting_refiner_paths()
        self._paths = self._counter.__enter__()
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step = trainer.global_step  # the optimizer step this batch makes

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append((self._step, float(loss.detach().float())))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.stop_after_epochs is not None and trainer.current_epoch + 1 >= (
            self.stop_after_epochs
        ):
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._counter = None
        norms = Counter(
            type(m).__name__
            for m in pl_module.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        )
        device = trainer.strategy.root_device
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        record = {
            "strategy": type(trainer.strategy).__name__,
            "world_size": trainer.world_size,
            "precision": str(trainer.precision),
            "device": device.type,
            "global_step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "losses": self.losses,
            "batchnorms": dict(norms),
            "refiner_paths": dict(self._paths),
            "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20
            if device.type == "cuda"
            else None,
            "grad_scale": float(scaler.get_scale()) if scaler is not None else None,
        }
        if trainer.is_global_zero:
            Path(self.path).write_text(json.dumps(record, indent=1))


# ----------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """fp32 matmuls and convolutions without TF32 (cuDNN uses TF32 by default)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def relative_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    return max_diff(out, ref) / max(float(ref.float().abs().max()), 1e-12)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _create(name: str, img_size: int, **kwargs: Any) -> torch.nn.Module:
    import timm

    import refiner_pl  # noqa: F401  (registers the presets)

    torch.manual_seed(0)
    return timm.create_model(name, num_classes=1000, img_size=img_size, **kwargs)


def _batch(n: int, img: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, img, img, generator=generator)
    y = torch.randint(0, 1000, (n,), generator=generator)
    return x.to(device), y.to(device)


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype)


def _run_process(args: list[str], log: Path, timeout: float, env: dict[str, str] | None = None):
    """Runs ``args`` in its own process group, output to ``log``; kills the group (DDP
    workers included) at ``timeout``. Returns (exit status or None on timeout, seconds)."""
    start = time.monotonic()
    with log.open("w") as out:
        out.write(" ".join(args) + "\n\n")
        out.flush()
        process = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True
        )
        try:
            code = process.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = None
    return code, time.monotonic() - start


def _log_tail(log: Path, lines: int = 6) -> str:
    text = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
    return " | ".join(line.strip() for line in text[-lines:])


# ----------------------------------------------------------------------------- cli.py fit
def _probe_arg(path: Path, stop_after_epochs: int | None = None) -> str:
    init: dict[str, Any] = {"path": str(path)}
    if stop_after_epochs is not None:
        init["stop_after_epochs"] = stop_after_epochs
    probe = {"class_path": "refiner_pl.device_check.FitProbe", "init_args": init}
    return "--trainer.callbacks+=" + json.dumps(probe)


def fit_args(
    run: Run,
    name: str,
    trainer_config: str,
    precision: str,
    model: str,
    img: int,
    batch: int,
    epochs: int,
    probe: Path,
    stop_after_epochs: int | None = None,
) -> list[str]:
    """A short `cli.py fit` on the generated folder, logged to ``<work>/runs/<name>``."""
    p = run.profile
    return [
        "fit",
        *("--trainer", str(CONFIGS / "trainer" / trainer_config)),
        *("--model", str(CONFIGS / "model" / f"{model}.yaml")),
        *("--data", str(CONFIGS / "data" / "folder.yaml")),
        *("--trainer.accelerator", "gpu" if p.device == "cuda" else "cpu"),
        *("--trainer.devices", "1"),
        *("--trainer.precision", precision),
        *("--trainer.max_epochs", str(epochs)),
        *("--trainer.log_every_n_steps", "1"),
        *("--trainer.num_sanity_val_steps", "0"),
        *("--trainer.enable_progress_bar", "false"),
        *("--trainer.enable_model_summary", "false"),
        *("--trainer.logger.init_args.save_dir", str(run.runs_dir)),
        *("--trainer.logger.init_args.name", name),
        _probe_arg(probe, stop_after_epochs),
        *("--model.lr", str(p.fit_lr)),
        *("--model.warmup_epochs", "1"),
        *("--model.drop_path_rate", "0.0"),
        *("--data.data_dir", str(run.data_dir)),
        *("--data.img_size", str(img)),
        *("--data.batch_size", str(batch)),
        *("--data.num_workers", str(p.num_workers)),
        *("--data.persistent_workers", str(p.num_workers > 0).lower()),
        *("--data.auto_augment", "null"),  # the class is the colour: keep it
        *("--data.color_jitter", "0"),
        *("--data.re_prob", "0"),
        *("--cpu_memory.enabled", "false"),  # process-wide malloc settings: not here
        *(
            ("--precise_bn.enabled", "false")
            if p.precise_bn_batches is None
            else ("--precise_bn.num_batches", str(p.precise_bn_batches))
        ),
    ]


def run_cli_in_process(args: list[str]) -> None:
    """`refiner_pl.cli.main(args)`; an ``error:`` exit becomes an exception."""
    from refiner_pl.cli import main

    try:
        main(args)
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise CheckFailed(f"cli.py {args[0]} exited with status {exit_.code}") from None


def _losses(record: dict[str, Any]) -> list[float]:
    return [loss for _, loss in record["losses"]]


def _check_fit_record(run: Run, record: dict[str, Any], numbers: dict[str, Any]) -> None:
    losses = _losses(record)
    expect(len(losses) > 0, "the fit recorded no training step")
    expect(all(math.isfinite(v) for v in losses), f"non-finite training loss: {losses}")
    fused = record["refiner_paths"].get("fused", 0)
    numbers["fused_refiner_calls"] = fused
    if run.device.type == "cuda":
        expect(fused == 0, f"the fused CPU refiner ran {fused} times in a CUDA fit")
    if record.get("peak_memory_mb") is not None:
        numbers["peak_memory_mb"] = round(record["peak_memory_mb"], 1)


def _fit(run: Run, precision: str, trainer_config: str, result: Result) -> None:
    p = run.profile
    probe = run.work / f"fit_{precision}.json"
    steps_per_epoch = p.fit_steps_per_epoch
    args = fit_args(
        run,
        f"fit_{precision}",
        trainer_config,
        precision,
        p.fit_model,
        p.fit_img,
        p.fit_batch,
        p.fit_epochs,
        probe,
    )
    run_cli_in_process(args)
    record = json.loads(probe.read_text())
    losses = _losses(record)
    first, last = float(np.mean(losses[:5])), float(np.mean(losses[-5:]))
    result.numbers.update(
        steps=len(losses),
        precision=record["precision"],
        first5_mean_loss=round(first, 4),
        last5_mean_loss=round(last, 4),
        grad_scale=record["grad_scale"],
    )
    _check_fit_record(run, record, result.numbers)
    expect(
        len(losses) == steps_per_epoch * p.fit_epochs,
        f"{len(losses)} steps, expected {steps_per_epoch * p.fit_epochs}",
    )
    expect(last < first, f"the loss did not fall: first 5 steps {first:.4f}, last 5 {last:.4f}")
    run.shared[f"fit_{precision}"] = (record, run.runs_dir / f"fit_{precision}")


# ---------------------------------------------------------------------------------- checks
def check_environment(run: Run, result: Result) -> None:
    result.criterion = "the device is there (GPU: CUDA with bf16)"
    numbers = result.numbers
    numbers.update(
        torch=torch.__version__,
        lightning=L.__version__,
        python=platform.python_version(),
        cpu_cores=os.cpu_count(),
        device=str(run.device),
    )
    if run.device.type == "cuda":
        props = torch.cuda.get_device_properties(run.device)
        numbers.update(
            gpu=props.name,
            gpu_memory_gb=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            gpus=torch.cuda.device_count(),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            bf16=torch.cuda.is_bf16_supported(),
        )
        expect(numbers["bf16"], "this GPU has no bf16: the bf16 checks cannot pass")
    else:
        numbers["cpu"] = platform.processor() or platform.machine()


def check_release_fixture(run: Run, result: Result) -> None:
    """The release's outputs on the device in fp32; the channels-last refiner too."""
    from refiner_pl.models import from_official_checkpoint

    result.criterion = (
        f"eval (fp32) and train (fp64) logits within {FIXTURE_ATOL:g} of the release, fp32 "
        f"train within {TRAIN_FP32_ATOL:g} (TF32 off); "
        f"refiner_channels_last train logits within {CHANNELS_LAST_ATOL:g}"
    )
    fixture = torch.load(FIXTURE, map_location="cpu", weights_only=True)
    x = fixture["input"].to(run.device)
    ref = {k: v.to(run.device) for k, v in fixture.items() if isinstance(v, torch.Tensor)}
    diffs = {}
    with torch.no_grad(), full_fp32():
        model = from_official_checkpoint(fixture["state_dict"]).to(run.device)
        diffs["eval_logits"] = max_diff(model(x), ref["eval_logits"])
        diffs["eval_cls_only"] = max_diff(model.forward_cls(x), ref["eval_logits_cls_only"])
        aux = model.aux_head(model.forward_features(x)[:, 1:])
        diffs["eval_aux_tokens"] = max_diff(aux, ref["eval_logits_aux_tokens"])
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):  # cuDNN's default
            default_tf32 = max_diff(model(x), ref["eval_logits"])  # for information
        out = model.double().train().forward_train(x.double(), mix_token=False)
        diffs["train_cls_fp64"] = max_diff(out.cls_logits.float(), ref["train_logits_cls"])
        diffs["train_aux_tokens_fp64"] = max_diff(
            out.aux_logits.float(), ref["train_logits_aux_tokens"]
        )
        model = from_official_checkpoint(fixture["state_dict"]).to(run.device).train()
        out = model.forward_train(x, mix_token=False)
        train_fp32 = max(
            max_diff(out.cls_logits, ref["train_logits_cls"]),
            max_diff(out.aux_logits, ref["train_logits_aux_tokens"]),
        )
        cl_model = from_official_checkpoint(fixture["state_dict"], refiner_channels_last=True)
        out = cl_model.to(run.device).train().forward_train(x, mix_token=False)
        channels_last = max_diff(out.cls_logits, ref["train_logits_cls"])
    result.numbers.update(
        {f"max_abs_diff_{k}": v for k, v in diffs.items()},
        max_abs_diff_train_fp32=train_fp32,
        max_abs_diff_channels_last_train_cls=channels_last,
        max_abs_diff_eval_with_tf32_convs=default_tf32,
    )
    worst = max(diffs, key=diffs.get)
    expect(diffs[worst] <= FIXTURE_ATOL, f"{worst} differs by {diffs[worst]:.2e}")
    expect(train_fp32 <= TRAIN_FP32_ATOL, f"fp32 train-mode logits differ by {train_fp32:.2e}")
    expect(channels_last <= CHANNELS_LAST_ATOL, f"channels-last refiner: {channels_last:.2e}")


def check_fused_cpu_path(run: Run, result: Result) -> None:
    """Training takes the fused CPU refiner only on the CPU in fp32, never on CUDA."""
    p = run.profile
    expected_fp32 = "some" if run.device.type == "cpu" else "none"
    result.criterion = f"fused refiner calls in a {run.device.type} training step: fp32 " + (
        f"{expected_fp32}, autocast none, eval none"
    )
    model = _create(p.amp_model, p.amp_img).to(run.device)
    x, y = _batch(2, p.amp_img, run.device)
    counts = {}
    for label, mode, precision in (
        ("train_fp32", "train", "fp32"),
        ("train_bf16", "train", "bf16"),
        ("eval_fp32", "eval", "fp32"),
    ):
        getattr(model, mode)()
        with counting_refiner_paths() as paths, _autocast(run.device, precision):
            loss = F.cross_entropy(model(x), y)
            if mode == "train":
                loss.backward()
        counts[label] = paths["fused"]
    result.numbers.update({f"calls_{k}": v for k, v in counts.items()})
    if run.device.type == "cpu":
        expect(counts["train_fp32"] > 0, "the probe saw no fused call in CPU fp32 training")
    else:
        expect(counts["train_fp32"] == 0, f"fused CPU refiner ran {counts['train_fp32']}x")
    expect(counts["train_bf16"] == 0 and counts["eval_fp32"] == 0, f"unexpected: {counts}")


def check_autocast_logits(run: Run, result: Result) -> None:
    """bf16 and fp16 autocast logits against fp32 on a fixed batch; BatchNorms under autocast."""
    p = run.profile
    tolerance = ", ".join(f"{m} {d} {t:g}" for (m, d), t in AUTOCAST_TOLERANCE.items())
    result.criterion = (
        f"max |logit diff| / max |fp32 logit| within: {tolerance}; finite; BatchNorm running "
        "statistics stay fp32 and match fp32's updates within 5%"
    )
    x, _ = _batch(p.amp_batch, p.amp_img, run.device)
    failures = []
    for twin, kwargs in (("refiner", {}), ("plain_twin", {"refiner": False})):
        model = _create(p.amp_model, p.amp_img, **kwargs).to(run.device)
        state = copy.deepcopy(model.state_dict())
        for mode in ("eval", "train"):
            with torch.no_grad(), full_fp32():
                model.load_state_dict(state)
                ref = getattr(model, mode)()(x)
                ref_stats = _refiner_running_means(model)
            for precision in ("bf16", "fp16"):
                model.load_state_dict(state)
                with torch.no_grad(), _autocast(run.device, precision):
                    out = model(x)
                rel = relative_diff(out, ref)
                key = f"{twin}_{mode}_{precision}"
                result.numbers[f"rel_diff_{key}"] = round(rel, 5)
                result.numbers[f"top1_agree_{key}"] = float(
                    (out.argmax(-1) == ref.argmax(-1)).float().mean()
                )
                if not torch.isfinite(out).all():
                    failures.append(f"{key}: non-finite logits")
                if twin == "refiner" and rel > AUTOCAST_TOLERANCE[(mode, precision)]:
                    failures.append(f"{key}: {rel:.4f} > {AUTOCAST_TOLERANCE[(mode, precision)]}")
                if twin == "refiner" and mode == "train" and ref_stats:
                    stats = _refiner_running_means(model)
                    dtypes = {t.dtype for t in stats}
                    stat_rel = max(
                        relative_diff(a, b) for a, b in zip(stats, ref_stats, strict=True)
                    )
                    result.numbers[f"bn_running_mean_rel_diff_{precision}"] = round(stat_rel, 5)
                    if dtypes != {torch.float32} or stat_rel > 0.05:
                        failures.append(f"BN running stats under {precision}: {dtypes}, {stat_rel}")
        del model
        _free(run.device)
    expect(not failures, "; ".join(failures))


def _refiner_running_means(model: torch.nn.Module) -> list[torch.Tensor]:
    return [
        m.running_mean.clone()
        for name, m in model.named_modules()
        if ".refiner." in f".{name}." and isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]


def _explain(model: torch.nn.Module, x: torch.Tensor) -> dict[str, Any]:
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    reasons = Counter(" ".join(str(r.reason).split())[:400] for r in explained.break_reasons)
    return {
        "graphs": explained.graph_count,
        "graph_breaks": explained.graph_break_count,
        "break_reasons": [f"{n}x {reason}" for reason, n in reasons.most_common(5)],
    }


def check_compile(run: Run, result: Result) -> None:
    """Graph breaks (torch._dynamo.explain) and compiled training steps against eager."""
    p = run.profile
    result.criterion = (
        f"forward+loss compiled with {p.compile_backend} (its backward through the compiled "
        f"graph, eager AdamW) gives the eager loss within {COMPILE_RTOL:g} relative over 3 "
        "steps, fp32; refiner BatchNorm running means agree likewise; graph breaks reported"
    )
    depth = {} if p.compile_depth is None else {"depth": p.compile_depth}
    model = _create(p.compile_model, p.compile_img, **depth).to(run.device)
    x, y = _batch(p.compile_batch, p.compile_img, run.device)
    state = copy.deepcopy(model.state_dict())
    result.numbers["blocks"] = len(model.blocks)
    explains = {}
    for label in p.explain:
        model.train(label != "eval").set_refiner_checkpointing(label == "train_refiner_ckpt")
        model.set_grad_checkpointing(label == "train_block_ckpt")
        with torch.set_grad_enabled(label != "eval"):
            explains[label] = _explain(model, x)
    model.set_refiner_checkpointing(False)
    model.set_grad_checkpointing(False)
    model.load_state_dict(state)  # explain ran training-mode forwards
    for label, info in explains.items():
        result.numbers[f"graphs_{label}"] = info["graphs"]
        result.numbers[f"graph_breaks_{label}"] = info["graph_breaks"]
        if info["break_reasons"]:
            result.notes.append(f"{label} breaks: " + "; ".join(info["break_reasons"]))
    torch._dynamo.reset()

    def steps(net: torch.nn.Module, forward: Callable) -> tuple[list[float], list[torch.Tensor]]:
        net.train()
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
        losses = []
        for _ in range(3):
            loss = F.cross_entropy(forward(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        return losses, _refiner_running_means(net)

    twin = copy.deepcopy(model)
    with full_fp32():
        eager_losses, eager_stats = steps(model, model)
        start = time.monotonic()
        compiled_losses, compiled_stats = steps(
            twin, torch.compile(twin, backend=p.compile_backend)
        )
    torch._dynamo.reset()
    rel = [abs(a - b) / abs(a) for a, b in zip(eager_losses, compiled_losses, strict=True)]
    stat_rel = max(relative_diff(a, b) for a, b in zip(compiled_stats, eager_stats, strict=True))
    result.numbers.update(
        compile_and_3_steps_s=round(time.monotonic() - start, 1),
        eager_losses=[round(v, 6) for v in eager_losses],
        compiled_losses=[round(v, 6) for v in compiled_losses],
        max_rel_loss_diff=max(rel),
        bn_running_mean_rel_diff=stat_rel,
    )
    expect(max(rel) <= COMPILE_RTOL, f"compiled loss differs by {max(rel):.2e} relative")
    expect(stat_rel <= COMPILE_RTOL, f"compiled BatchNorm running means differ by {stat_rel:.2e}")


def _fit_criterion(profile: Profile) -> str:
    steps = profile.fit_steps_per_epoch * profile.fit_epochs
    return f"{steps} steps of cli.py fit: finite losses, last 5 below first 5"


def check_fit_16_mixed(run: Run, result: Result) -> None:
    result.criterion = _fit_criterion(run.profile)
    _fit(run, "16-mixed", "gpu_fp16.yaml", result)


def check_fit_bf16_mixed(run: Run, result: Result) -> None:
    result.criterion = _fit_criterion(run.profile)
    _fit(run, "bf16-mixed", "gpu_bf16.yaml", result)


def check_resume_last(run: Run, result: Result) -> None:
    """A fit stopped after some epochs and resumed with ``--ckpt_path last`` continues the
    stored step and matches the uninterrupted bf16-mixed fit."""
    p = run.profile
    result.criterion = (
        "the resumed fit starts at the stored step, ends at the full run's, and its losses "
        f"match the uninterrupted bf16-mixed fit within {RESUME_RTOL:g} relative"
    )
    steps_per_epoch = p.fit_steps_per_epoch
    first, second = run.work / "resume_first.json", run.work / "resume_second.json"
    common = dict(
        run=run,
        name="resume",
        trainer_config="gpu_bf16.yaml",
        precision="bf16-mixed",
        model=p.fit_model,
        img=p.fit_img,
        batch=p.fit_batch,
        epochs=p.fit_epochs,
    )
    run_cli_in_process(fit_args(**common, probe=first, stop_after_epochs=p.resume_stop_epoch))
    run_cli_in_process([*fit_args(**common, probe=second), "--ckpt_path", "last"])
    before, after = json.loads(first.read_text()), json.loads(second.read_text())
    stop_step = steps_per_epoch * p.resume_stop_epoch
    resumed_steps = [step for step, _ in after["losses"]]
    result.numbers.update(
        stopped_at_step=before["global_step"],
        resumed_from_step=resumed_steps[0] if resumed_steps else None,
        final_step=after["global_step"],
    )
    _check_fit_record(run, after, result.numbers)
    expect(before["global_step"] == stop_step, f"stopped at {before['global_step']}")
    expect(resumed_steps[:1] == [stop_step], f"resumed at {resumed_steps[:1]}, not {stop_step}")
    expect(after["global_step"] == steps_per_epoch * p.fit_epochs, "ended early or late")
    reference = run.shared.get("fit_bf16-mixed")
    if reference is None:
        result.notes.append("no bf16-mixed fit to compare with (that check failed or was off)")
        return
    ref_record, ref_dir = reference
    ref_losses = dict((step, loss) for step, loss in ref_record["losses"])
    rel = [abs(loss - ref_losses[step]) / abs(ref_losses[step]) for step, loss in after["losses"]]
    result.numbers["max_rel_loss_diff_vs_uninterrupted"] = max(rel)
    weights = [_last_state(run.runs_dir / "resume"), _last_state(ref_dir)]
    result.numbers["max_abs_weight_diff_vs_uninterrupted"] = max(
        max_diff(weights[0][k], weights[1][k])
        for k in weights[1]
        if weights[1][k].is_floating_point()
    )
    expect(max(rel) <= RESUME_RTOL, f"resumed losses differ by {max(rel):.2e} relative")


def _last_state(run_root: Path) -> dict[str, torch.Tensor]:
    """The state dict in the newest ``last.ckpt`` under ``run_root``."""
    path = max(run_root.glob("version_*/checkpoints/last.ckpt"), key=lambda q: q.stat().st_mtime)
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _subprocess_fit(run: Run, result: Result, name: str, args: list[str]) -> dict[str, Any]:
    log = run.out / "logs" / f"{name}.log"
    env = {**os.environ, "OMP_NUM_THREADS": str(run.profile.threads)}
    timeout = min(3 * run.profile.budgets[name], run.remaining())
    code, seconds = _run_process([sys.executable, str(REPO / "cli.py"), *args], log, timeout, env)
    result.numbers["process_s"] = round(seconds, 1)
    expect(code is not None, f"killed after {timeout:.0f} s: see {log}")
    expect(code == 0, f"cli.py fit exited with {code}: {_log_tail(log)}")
    return json.loads((run.work / f"{name}.json").read_text())


def check_ddp_one_gpu(run: Run, result: Result) -> None:
    """`cli.py fit` under configs/trainer/ddp_bf16.yaml on one device, in its own process."""
    p = run.profile
    result.criterion = "exit 0, DDPStrategy, finite losses, all epochs" + (
        ", every BatchNorm a SyncBatchNorm" if p.sync_batchnorm else ""
    )
    probe = run.work / "ddp_one_gpu.json"
    epochs = 2
    args = fit_args(
        run,
        "ddp",
        "ddp_bf16.yaml",
        "bf16-mixed",
        p.ddp_model,
        p.ddp_img,
        p.ddp_batch,
        epochs,
        probe,
    )
    args += ["--trainer.sync_batchnorm", str(p.sync_batchnorm).lower()]
    record = _subprocess_fit(run, result, "ddp_one_gpu", args)
    result.numbers.update(
        strategy=record["strategy"],
        world_size=record["world_size"],
        batchnorms=record["batchnorms"],
    )
    _check_fit_record(run, record, result.numbers)
    expect(record["strategy"] == "DDPStrategy", f"strategy {record['strategy']}")
    steps = p.classes * p.train_per_class // p.ddp_batch * epochs
    expect(record["global_step"] == steps, f"{record['global_step']} steps, not {steps}")
    if p.sync_batchnorm:
        expect(set(record["batchnorms"]) == {"SyncBatchNorm"}, f"{record['batchnorms']}")


def check_fsdp_one_gpu(run: Run, result: Result) -> None:
    """`cli.py fit` under configs/trainer/fsdp_bf16.yaml on one device (its own process)."""
    p = run.profile
    expected = "FSDPStrategy" if p.fsdp_strategy is None else "DDPStrategy"
    result.criterion = f"exit 0, {expected}, finite losses, a full (unsharded) last.ckpt"
    probe = run.work / "fsdp_one_gpu.json"
    args = fit_args(
        run,
        "fsdp",
        "fsdp_bf16.yaml",
        "bf16-mixed",
        p.fsdp_model,
        p.fsdp_img,
        p.fsdp_batch,
        1,
        probe,
    )
    args += [
        *("--ema", "null"),
        *("--model.grad_checkpointing", "true"),
        *("--trainer.limit_train_batches", str(p.fsdp_steps)),
        *("--trainer.limit_val_batches", "2"),
    ]
    if p.fsdp_strategy is not None:
        args += ["--trainer.strategy", p.fsdp_strategy]
    record = _subprocess_fit(run, result, "fsdp_one_gpu", args)
    result.numbers.update(strategy=record["strategy"], world_size=record["world_size"])
    _check_fit_record(run, record, result.numbers)
    expect(record["strategy"] == expected, f"strategy {record['strategy']}")
    steps = p.fsdp_steps
    expect(record["global_step"] == steps, f"{record['global_step']} steps, not {steps}")
    state = _last_state(run.runs_dir / "fsdp")
    key = "model.blocks.1.attn.refiner.expand.weight"
    expect(key in state, f"last.ckpt has no {key}: not a full state dict")
    result.numbers["ckpt_tensors"] = len(state)
    result.numbers["ckpt_expand_weight_shape"] = list(state[key].shape)
    expect(state[key].numel() > 0, "the checkpoint holds an empty shard")


def check_benchmark(run: Run, result: Result, bench: Bench) -> None:
    """``python -m refiner_pl.benchmark throughput`` in its own process: a fresh allocator
    for its peak memory and no compiled graphs left over from the other runs."""
    p = run.profile
    result.criterion = "exit 0 and positive img/s for both models" + (
        "; an out-of-memory is reported as the answer" if bench.oom_is_a_finding else ""
    )
    slug = "".join(c if c.isalnum() else "_" for c in bench.label.lower())
    out = run.out / "bench" / f"{slug}.json"
    args = [
        sys.executable,
        "-m",
        "refiner_pl.benchmark",
        "throughput",
        *("--model", bench.model, "--baseline", bench.baseline),
        *("--img_size", str(bench.img_size), "--batch_size", str(bench.batch_size)),
        *("--checkpointing", bench.checkpointing, "--precision", p.bench_precision),
        *("--compile", str(bench.compile).lower(), "--compile_backend", p.bench_compile_backend),
        *("--device", p.device, "--threads", str(p.threads)),
        *("--rounds", str(p.bench_rounds), "--train_steps", str(p.bench_steps)),
        *("--infer_steps", str(p.bench_steps)),
        # compiled runs would compile twice more for the memory runs: eager runs measure it
        *("--memory", str(p.device == "cuda" and not bench.compile).lower()),
        *("--keep_freed_memory", "false"),
        *("--out", str(out)),
    ]
    log = run.out / "logs" / f"bench_{slug}.log"
    timeout = min(3 * bench.budget_s, run.remaining())
    code, seconds = _run_process(args, log, timeout)
    result.numbers["process_s"] = round(seconds, 1)
    if code != 0 and bench.oom_is_a_finding and "out of memory" in log.read_text().lower():
        result.numbers["out_of_memory"] = True
        result.notes.append(f"{bench.label}: out of memory at batch {bench.batch_size}")
        return
    expect(code is not None, f"killed after {timeout:.0f} s: see {log}")
    expect(code == 0, f"benchmark exited with {code}: {_log_tail(log)}")
    report = json.loads(out.read_text())
    for name, entry in report["models"].items():
        role = "refiner" if name == bench.model else "baseline"
        for key, value in entry.items():
            result.numbers[f"{role}_{key}"] = round(value, 2)
        expect(entry["train_img_s"] > 0 and entry["infer_img_s"] > 0, f"{name}: no img/s")
    result.numbers["train_ratio"] = round(report["ratio"]["train"], 3)
    result.numbers["infer_ratio"] = round(report["ratio"]["infer"], 3)


# ----------------------------------------------------------------------------- the runner
@dataclass(frozen=True)
class Check:
    name: str
    run: Callable[[Run, Result], None]
    budget_s: float
    required: bool = True


def checks_for(profile: Profile) -> list[Check]:
    fixed = [
        Check("environment", check_environment, profile.budgets["environment"]),
        Check("release_fixture", check_release_fixture, profile.budgets["release_fixture"]),
        Check("fused_cpu_path", check_fused_cpu_path, profile.budgets["fused_cpu_path"]),
        Check("autocast_logits", check_autocast_logits, profile.budgets["autocast_logits"]),
        Check("compile", check_compile, profile.budgets["compile"]),
        Check("fit_16_mixed", check_fit_16_mixed, profile.budgets["fit_16_mixed"]),
        Check("fit_bf16_mixed", check_fit_bf16_mixed, profile.budgets["fit_bf16_mixed"]),
        Check("resume_last", check_resume_last, profile.budgets["resume_last"]),
        Check("ddp_one_gpu", check_ddp_one_gpu, profile.budgets["ddp_one_gpu"]),
        Check("fsdp_one_gpu", check_fsdp_one_gpu, profile.budgets["fsdp_one_gpu"]),
    ]
    benches = [
        Check(
            "benchmark " + bench.label,
            lambda run, result, bench=bench: check_benchmark(run, result, bench),
            bench.budget_s,
            bench.required,
        )
        for bench in profile.benchmarks
    ]
    return fixed + benches


ONE_GPU_CANNOT_SHOW = [
    "gradient all-reduce over NCCL between GPUs: its cost, and its overlap with backward",
    "SyncBatchNorm's cross-GPU statistics: with one process it normalises like BatchNorm",
    "FSDP's sharding: with one process every unit holds all of its weights, so neither the "
    "memory saved nor the all-gather/reduce-scatter traffic shows",
    "the per-rank data split and metric reduction over NCCL (tested on CPU gloo processes)",
    "several nodes: torchrun/SLURM rendezvous, inter-node bandwidth, scaling efficiency",
]


def run_checks(profile: Profile, out: Path, only: list[str] | None, budget_s: float) -> int:
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    (out / "bench").mkdir(exist_ok=True)
    torch.set_num_threads(profile.threads)
    started = time.monotonic()
    selected = [c for c in checks_for(profile) if only is None or c.name in only]
    results: list[Result] = []
    header = {
        "profile": profile.name,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "budget_s": budget_s,
        "command": " ".join(sys.argv),
        "substitutions": list(profile.substitutions),
        "one_gpu_cannot_show": ONE_GPU_CANNOT_SHOW,
    }
    with tempfile.TemporaryDirectory(prefix="device_check_") as work:
        run = Run(
            profile, out, Path(work), started, started + budget_s, torch.device(profile.device)
        )
        for check in selected:
            result = Result(check.name, "pass", 0.0, check.budget_s, required=check.required)
            # required checks start while time is left, optional ones only with their budget
            if run.remaining() <= (0 if check.required else check.budget_s):
                result.status = "skipped"
                result.notes.append(f"not started: {run.remaining():.0f} s of the budget left")
            else:
                print(f"\n=== {check.name} (budget {check.budget_s:.0f} s)", flush=True)
                start = time.monotonic()
                faulthandler.dump_traceback_later(max(4 * check.budget_s, 120), exit=False)
                try:
                    check.run(run, result)
                except Exception as err:  # one failing check does not stop the others
                    result.status = "fail"
                    result.error = f"{type(err).__name__}: {err}"
                    (out / "logs" / f"{check.name.replace(' ', '_')}.traceback").write_text(
                        traceback.format_exc()
                    )
                finally:
                    faulthandler.cancel_dump_traceback_later()
                    _free(run.device)
                result.seconds = round(time.monotonic() - start, 1)
                print(f"=== {check.name}: {result.status} in {result.seconds} s", flush=True)
            results.append(result)
            write_reports(out, header, results, time.monotonic() - started)
    total = time.monotonic() - started
    write_reports(out, header, results, total)
    print_summary(results, total, out)
    failed = [r for r in results if r.status == "fail" or (r.status == "skipped" and r.required)]
    return 1 if failed else 0


def write_reports(out: Path, header: dict, results: list[Result], seconds: float) -> None:
    report = {**header, "seconds": round(seconds, 1), "checks": [asdict(r) for r in results]}
    (out / "device_check.json").write_text(json.dumps(report, indent=1, default=str))
    lines = [
        f"# Device check ({header['profile']}), {header['date']}",
        "",
        f"`{header['command']}`: {seconds:.0f} s of a {header['budget_s']:.0f} s budget.",
        "",
        "| check | status | s (budget) | numbers |",
        "|---|---|---|---|",
    ]
    for r in results:
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in r.numbers.items())
        lines.append(f"| {r.name} | {r.status} | {r.seconds} ({r.budget_s:.0f}) | {shown} |")
    lines.append("")
    for r in results:
        lines.append(f"## {r.name}: {r.status}")
        lines.append("")
        if r.criterion:
            lines.append(f"Criterion: {r.criterion}.")
        if r.error:
            lines.append(f"Error: `{r.error}`")
        for note in r.notes:
            lines.append(f"- {note}")
        lines.append("")
    if header["substitutions"]:
        lines += ["## What this smoke run substitutes", ""]
        lines += [f"- {s}" for s in header["substitutions"]] + [""]
    lines += ["## What a one-GPU machine cannot show", ""]
    lines += [f"- {s}" for s in header["one_gpu_cannot_show"]] + [""]
    (out / "device_check.md").write_text("\n".join(lines))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def print_summary(results: list[Result], seconds: float, out: Path) -> None:
    print(f"\ndevice check: {seconds:.0f} s, reports in {out}")
    for r in results:
        key = ", ".join(f"{k} {_fmt(v)}" for k, v in list(r.numbers.items())[:4])
        line = f"  {r.status.upper():7} {r.name:34} {r.seconds:6.1f} s  {key}"
        print(line + (f"\n          {r.error}" if r.error else ""))
    counts = Counter(r.status for r in results)
    print("  " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))


# ------------------------------------------------------------------------- command line
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (`reporting_user_errors`)
        raise UserInputError(f"{message} (usage: scripts/device_check.sh [--cpu-smoke] OUT)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="scripts/device_check.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder for device_check.json/.md, logs and benchmarks")
    parser.add_argument("--cpu-smoke", action="store_true", help="the CPU run at tiny sizes")
    parser.add_argument("--only", help="comma-separated check names (a rerun of some checks)")
    parser.add_argument("--budget", type=float, help="seconds for the whole run")
    args = parser.parse_args(argv)
    profile = CPU_SMOKE if args.cpu_smoke else GPU
    names = [c.name for c in checks_for(profile)]
    args.only = [n.strip() for n in args.only.split(",")] if args.only else None
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        raise UserInputError(f"--only: unknown checks {unknown}; the checks are {names}")
    out = Path(args.out)
    if (out / "device_check.json").exists():
        raise UserInputError(
            f"{out} already holds a device check report: pass a new folder, so it is kept"
        )
    if out.exists() and not out.is_dir():
        raise UserInputError(f"{out} is a file: pass a folder for the reports")
    if args.budget is not None and args.budget <= 0:
        raise UserInputError(f"--budget {args.budget:g}: give a positive number of seconds")
    if profile.device == "cuda" and not torch.cuda.is_available():
        raise UserInputError("no CUDA device here: run on a GPU machine, or pass --cpu-smoke")
    if not FIXTURE.is_file() or not CONFIGS.is_dir():
        raise UserInputError(f"{FIXTURE} or {CONFIGS} is missing: run from a full checkout")
    args.profile = profile
    return args


def main(argv: list[str] | None = None) -> int:
    with reporting_user_errors():
        args = parse_args(argv)
    budget = args.budget if args.budget is not None else args.profile.budget_s
    return run_checks(args.profile, Path(args.out), args.only, budget)


if __name__ == "__main__":
    sys.exit(main())
