"""Throughput and memory of a model against timm's DeiT-S, measured in the same process.

    python -m refiner_pl.benchmark throughput --model refiner_vit_s --img_size 224 --batch_size 8
    python -m refiner_pl.benchmark lightning_overhead

``throughput`` alternates the model and the baseline round by round, so a busy machine slows
both alike and the ratio stays meaningful. It reports img/s of a training step (forward,
backward, AdamW step) and of inference, each the median over single timed steps, and peak
memory. Each timed block starts with one untimed step, so both models are measured in the
steady state of back-to-back steps. ``lightning_overhead`` times the quickstart's fit loop
against a plain PyTorch loop over the same model and data.
Both print a table and write JSON.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import platform
import resource
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from jsonargparse import auto_cli

import refiner_pl  # noqa: F401  (registers the presets)
from refiner_pl.callbacks.cpu_memory import keep_freed_memory as _keep_freed_memory

Precision = Literal["fp32", "bf16", "fp16"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: Precision):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def _build(name: str, cfg: dict[str, Any], device: torch.device):
    kwargs = cfg["model_kwargs"] if name == cfg["model"] else {}
    model = timm.create_model(name, img_size=cfg["img_size"], num_classes=1000, **kwargs)
    model = model.to(device)
    channels_last, compile_ = cfg["channels_last"], cfg["compile"]
    if name == cfg["model"] and cfg["checkpointing"] == "blocks":
        model.set_grad_checkpointing(True)
    elif name == cfg["model"] and cfg["checkpointing"] == "refiner":
        model.set_refiner_checkpointing(True)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_:
        return torch.compile(model, backend=cfg.get("compile_backend", "inductor"))
    return model


class _Runner:
    """One model's training step and inference step on fixed random data."""

    def __init__(self, name: str, cfg: dict[str, Any], device: torch.device) -> None:
        self.name, self.cfg, self.device = name, cfg, device
        self.model = _build(name, cfg, device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.x = torch.randn(cfg["batch_size"], 3, cfg["img_size"], cfg["img_size"], device=device)
        if cfg["channels_last"]:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, 1000, (cfg["batch_size"],), device=device)

    def train_step(self) -> None:
        self.model.train()
        with _autocast(self.device, self.cfg["precision"]):
            loss = F.cross_entropy(self.model(self.x), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    @torch.inference_mode()
    def infer_step(self) -> None:
        self.model.eval()
        with _autocast(self.device, self.cfg["precision"]):
            self.model(self.x)

    def timed(self, mode: str, steps: int) -> list[float]:
        """Images per second of each of ``steps`` steps, after one untimed step: the first
        step after the other model ran refills the allocator's free lists (on CPU it faults
        in hundreds of MB of fresh pages), which back-to-back steps of a real run never pay."""
        step = self.train_step if mode == "train" else self.infer_step
        step()
        rates = []
        for _ in range(steps):
            _sync(self.device)
            start = time.perf_counter()
            step()
            _sync(self.device)
            rates.append(self.cfg["batch_size"] / (time.perf_counter() - start))
        return rates


def _peak_rss_kb() -> int:
    """This process's resident-set peak in kB. Linux's VmHWM starts afresh with each
    program; ``ru_maxrss`` (the fallback elsewhere) carries over the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_memory_child(name: str, cfg: dict[str, Any], mode: str, queue: Any) -> None:
    torch.set_num_threads(cfg["threads"])
    if cfg["keep_freed_memory"]:
        _keep_freed_memory()
    runner = _Runner(name, cfg, torch.device("cpu"))
    before = _peak_rss_kb()
    (runner.train_step if mode == "train" else runner.infer_step)()
    after = _peak_rss_kb()
    queue.put((after, after - before))


def _peak_memory_mb(name: str, cfg: dict[str, Any], mode: str, device: torch.device) -> float:
    """Memory one step needs on top of the built model: CUDA's allocator peak, or on CPU how
    far the step raises the resident-set peak of a fresh process that built the model."""
    if device.type == "cuda":
        runner = _Runner(name, cfg, device)
        (runner.train_step if mode == "train" else runner.infer_step)()
        torch.cuda.reset_peak_memory_stats(device)
        (runner.train_step if mode == "train" else runner.infer_step)()
        peak = torch.cuda.max_memory_allocated(device) / 2**20  # weights, optimizer state and step
        del runner
        torch.cuda.empty_cache()
        return peak
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_peak_memory_child, args=(name, cfg, mode, queue))
    process.start()
    _, step_kb = queue.get()
    process.join()
    return step_kb / 1024


def throughput(
    model: str = "refiner_vit_s",
    baseline: str = "deit_small_patch16_224",
    model_kwargs: dict[str, Any] | None = None,
    checkpointing: Literal["off", "refiner", "blocks"] = "off",
    img_size: int = 224,
    batch_size: int = 8,
    precision: Precision = "fp32",
    channels_last: bool = False,
    compile: bool = False,
    compile_backend: str = "inductor",
    device: str = "cpu",
    threads: int = 2,
    rounds: int = 3,
    train_steps: int = 3,
    infer_steps: int = 3,
    memory: bool = True,
    keep_freed_memory: bool = True,
    out: str = "benchmark.json",
) -> dict[str, Any]:
    """Training and inference img/s of ``model`` and ``baseline``, interleaved, and ratios.

    ``compile_backend``: torch.compile's backend when ``compile`` is true (``eager`` or
    ``aot_eager`` trace without generating code: a quick run on a CPU).
    ``keep_freed_memory`` (CPU, glibc): both models run with glibc's malloc keeping freed
    memory for reuse, as ``python cli.py fit`` does on CPU (`KeepFreedMemory`); ``false``
    measures the C library's defaults.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    keep_freed_memory = keep_freed_memory and dev.type == "cpu"
    cfg = dict(
        model=model, model_kwargs=model_kwargs or {}, checkpointing=checkpointing,
        img_size=img_size, batch_size=batch_size, precision=precision,
        channels_last=channels_last, compile=compile, compile_backend=compile_backend,
        threads=threads,
        keep_freed_memory=keep_freed_memory,
    )  # fmt: skip
    # Memory first, each in a fresh process, before this one runs anything.
    peaks = {
        name: {
            f"{mode}_peak_mb": _peak_memory_mb(name, cfg, mode, dev) for mode in ("train", "infer")
        }
        for name in (model, baseline)
        if memory
    }
    if keep_freed_memory:
        cfg["keep_freed_memory"] = _keep_freed_memory()  # false where malloc is not glibc's
    runners = {name: _Runner(name, cfg, dev) for name in (model, baseline)}
    for runner in runners.values():  # warm-up (and compilation)
        runner.train_step()
        runner.infer_step()
    samples: dict[str, dict[str, list[float]]] = {n: {"train": [], "infer": []} for n in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            samples[name]["train"] += runner.timed("train", train_steps)
            samples[name]["infer"] += runner.timed("infer", infer_steps)
    del runners
    result: dict[str, Any] = {
        "config": {
            **cfg,
            "device": device,
            "rounds": rounds,
            "train_steps": train_steps,
            "infer_steps": infer_steps,
        },  # fmt: skip
        "machine": {
            "device_name": torch.cuda.get_device_name(dev)
            if dev.type == "cuda"
            else platform.processor() or platform.machine(),
            "torch": torch.__version__,
        },
        "models": {},
    }
    for name in (model, baseline):
        entry: dict[str, Any] = {
            "train_img_s": statistics.median(samples[name]["train"]),
            "infer_img_s": statistics.median(samples[name]["infer"]),
        }
        entry.update(peaks.get(name, {}))
        result["models"][name] = entry
    ours, base = result["models"][model], result["models"][baseline]
    result["ratio"] = {
        "train": ours["train_img_s"] / base["train_img_s"],
        "infer": ours["infer_img_s"] / base["infer_img_s"],
    }
    _report(result, out)
    return result


def lightning_overhead(
    epochs: int = 3,
    rounds: int = 3,
    limit_batches: int | None = None,
    threads: int = 2,
    out: str = "lightning_overhead.json",
) -> dict[str, Any]:
    """Seconds per training step of Lightning's fit loop vs a plain loop, on the quickstart.

    Both run the same ImageClassifier (model, optimizer, schedule) on the same DataLoader;
    validation, checkpointing, logging and the progress bar are off in both. Each round runs
    a fresh Lightning fit and then a fresh plain loop of ``epochs`` epochs, the first epoch of
    each a warm-up that is not timed; the medians over all timed epochs are compared, so a
    machine that speeds up or slows down affects both alike. ``limit_batches`` shortens the
    epochs of both (a smoke run).
    """
    import lightning as L

    from refiner_pl.data import DigitsDataModule
    from refiner_pl.module import ImageClassifier

    torch.set_num_threads(threads)

    def make() -> tuple[ImageClassifier, DigitsDataModule]:
        L.seed_everything(0, verbose=False)
        data = DigitsDataModule(batch_size=64)
        module = ImageClassifier(
            model_name="refiner_vit_tiny", num_classes=10, img_size=32, warmup_epochs=0.5
        )
        return module, data

    class _EpochTimer(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.times.append(time.perf_counter() - self.start)

    def lightning_epochs() -> tuple[list[float], int]:
        module, data = make()
        timer = _EpochTimer()
        trainer = L.Trainer(
            max_epochs=epochs, accelerator="cpu", devices=1, logger=False, callbacks=[timer],
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0, num_sanity_val_steps=0, limit_train_batches=limit_batches,
        )  # fmt: skip
        trainer.fit(module, datamodule=data)
        steps = trainer.num_training_batches
        return [t / steps for t in timer.times[1:]], steps

    def plain_epochs() -> list[float]:
        module, data = make()
        data.setup("fit")
        loader = data.train_dataloader()
        optimizer = create_plain_optimizer(module)
        steps = min(len(loader), limit_batches or len(loader))
        times = []
        module.train()
        for _ in range(epochs):
            start = time.perf_counter()
            for x, y in itertools.islice(loader, steps):
                loss = module.train_criterion(module(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            times.append((time.perf_counter() - start) / steps)
        return times[1:]

    lightning_times: list[float] = []
    plain_times: list[float] = []
    for _ in range(rounds):
        times, steps_per_epoch = lightning_epochs()
        lightning_times += times
        plain_times += plain_epochs()
    lightning_s, plain_s = statistics.median(lightning_times), statistics.median(plain_times)
    result = {
        "steps_per_epoch": steps_per_epoch,
        "timed_epochs": len(lightning_times),
        "lightning_s_per_step": lightning_s,
        "plain_s_per_step": plain_s,
        "overhead": lightning_s / plain_s - 1,
    }
    print(json.dumps(result, indent=2))
    Path(out).write_text(json.dumps(result, indent=2))
    return result


def create_plain_optimizer(module: Any) -> torch.optim.Optimizer:
    """The module's own optimizer (timm AdamW with its parameter groups), without Lightning."""
    from timm.optim import create_optimizer_v2

    hp = module.hparams
    return create_optimizer_v2(module.model, opt=hp.opt, lr=hp.lr, weight_decay=hp.weight_decay)


def _report(result: dict[str, Any], out: str) -> None:
    cfg = result["config"]
    print(
        f"{cfg['device']} ({result['machine']['device_name']}), {cfg['precision']}, batch "
        f"{cfg['batch_size']}, {cfg['img_size']} px, channels_last={cfg['channels_last']}, "
        f"compile={cfg['compile']}, threads={cfg['threads']}, "
        f"keep_freed_memory={cfg['keep_freed_memory']}"
    )
    print(f"{'model':<28}{'train img/s':>12}{'infer img/s':>12}{'train MB':>10}{'infer MB':>10}")
    # MB: on CUDA the allocator peak of a step; on CPU what one step adds to the resident peak
    for name, entry in result["models"].items():
        print(
            f"{name:<28}{entry['train_img_s']:>12.2f}{entry['infer_img_s']:>12.2f}"
            f"{entry.get('train_peak_mb', float('nan')):>10.0f}"
            f"{entry.get('infer_peak_mb', float('nan')):>10.0f}"
        )
    print(f"{'ratio':<28}{result['ratio']['train']:>12.2f}{result['ratio']['infer']:>12.2f}")
    Path(out).write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


def main() -> None:
    auto_cli([throughput, lightning_overhead])


if __name__ == "__main__":
    main()
