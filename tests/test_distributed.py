"""Scaling out on real processes: DDP on the CPU (gloo), two torchrun "nodes" on loopback,
metrics reduced across ranks, resuming on another world size, SyncBatchNorm and FSDP.

Every distributed run is a subprocess: cli.py, or this file as a torchrun worker (see the
bottom), so no process group is ever created inside pytest.
"""

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from copy import deepcopy
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import timm
import torch
import yaml
from helpers import (
    QUICKSTART,
    QUIET,
    REPO,
    CliResult,
    imagenet_recipe,
    logged_metric,
    run_cli_subprocess,
)
from jsonargparse import ArgumentParser
from lightning.pytorch.plugins import TorchSyncBatchNorm
from lightning.pytorch.strategies import FSDPStrategy, Strategy
from torch import nn

from refiner_pl.cli import main
from refiner_pl.data import DigitsDataModule
from refiner_pl.models import fast_refiner
from refiner_pl.models.refiner_vit import RefinerBlock

TWO_PROCESSES = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]
# Short fits: few train batches, full validation; no warmup, so one epoch is a valid schedule.
SHORT = ["--trainer.limit_train_batches", "3", "--model.warmup_epochs", "0", *QUIET]
# 20.06% of the 1,797 digits: 361 val images, 181 and 180 per rank; at batch 45 rank 0 runs
# 5 batches and rank 1 runs 4. Lightning's default sampler would score 362 (one twice).
ODD_VAL = ["--data.val_fraction", "0.2006", "--data.batch_size", "45"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def single_thread_env() -> dict[str, str]:
    """Two processes share two cores: one thread each avoids oversubscription."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def wait_for_all(processes: list[subprocess.Popen], timeout: float = 600) -> None:
    """Waits for every process; once one fails (or time is up) the others are stopped, as
    they would otherwise wait for their lost peer until the rendezvous timeout."""
    deadline = time.monotonic() + timeout
    while None in (codes := [process.poll() for process in processes]):
        if any(code not in (None, 0) for code in codes) or time.monotonic() > deadline:
            for process, code in zip(processes, codes, strict=True):
                if code is None:
                    os.killpg(process.pid, signal.SIGKILL)
        time.sleep(0.2)


def run_separately(*args: str, cwd: Path) -> CliResult:
    """A successful ``cli.py ARGS`` in a fresh interpreter (DDP starts its ranks from it)."""
    return run_cli_subprocess(*args, cwd=cwd, env=single_thread_env()).check()


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def loop_state(path: Path) -> tuple[int, int]:
    """(epoch, global_step) stored in a checkpoint."""
    checkpoint = load(path)
    return checkpoint["epoch"], checkpoint["global_step"]


def best_val_acc1(checkpoint: dict) -> float:
    """The val/acc1 that the fit's best-checkpoint callback recorded."""
    [score] = [
        state["best_model_score"]
        for key, state in checkpoint["callbacks"].items()
        if key.startswith("ModelCheckpoint") and state.get("monitor") == "val/acc1"
    ]
    return float(score)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, CliResult]:
    """A 2-process DDP quickstart fit (2 epochs of 3 steps) with configs/trainer/ddp_bf16.yaml
    on the CPU in fp32 (bf16 steps are slow here); its run folder and result. The other DDP
    file, ddp_2x8_bf16.yaml, is the torchrun test's."""
    cwd = tmp_path_factory.mktemp("ddp")
    trainer = ["--trainer", str(REPO / "configs" / "trainer" / "ddp_bf16.yaml")]
    trainer += ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true"]
    epochs = ["--trainer.max_epochs", "2"]
    fit = run_separately(
        "fit", "--config", QUICKSTART, *trainer, *TWO_PROCESSES, *epochs, *SHORT, cwd=cwd
    )
    return cwd / "runs" / "quickstart" / "version_0", fit


# ------------------------------------------------------------------------------ DDP runs
@pytest.mark.slow
def test_ddp_fit_on_two_cpu_processes(ddp_run):
    run, fit = ddp_run
    assert "Starting with 2 processes" in fit.stdout + fit.stderr
    assert loop_state(run / "checkpoints" / "last.ckpt") == (1, 6)  # 3 steps per epoch
    assert len(list(run.glob("checkpoints/epoch=*.ckpt"))) == 1


@pytest.mark.slow
def test_two_node_torchrun_fit_then_single_process_validate(run_cli, tmp_path):
    """scripts/torchrun_2x8.sh with one CPU process per node: two launchers, ``torchrun
    --nnodes 2 --node_rank 0|1 --nproc_per_node 1 --master_addr 127.0.0.1 --master_port P
    cli.py fit ...``, meet on loopback; Lightning takes the ranks from torchrun's environment
    (TorchElasticEnvironment) and num_nodes 2 from configs/trainer/ddp_2x8_bf16.yaml."""
    env = single_thread_env() | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env |= {"NPROC_PER_NODE": "1", "PYTHON": sys.executable}
    on_cpu = ["--trainer.accelerator", "cpu", "--trainer.devices", "1"]
    on_cpu += ["--trainer.precision", "32-true", "--trainer.max_epochs", "1"]
    command = ["bash", str(REPO / "scripts" / "torchrun_2x8.sh"), QUICKSTART, *on_cpu, *SHORT]
    logs = [tmp_path / f"node{node}.log" for node in (0, 1)]
    launchers = []
    for node, log in enumerate(logs):
        with log.open("w") as out:
            launchers.append(
                subprocess.Popen(
                    command,
                    cwd=tmp_path,
                    env=env | {"NODE_RANK": str(node)},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group, to stop it with its workers
                )
            )
    wait_for_all(launchers)
    outputs = [log.read_text() for log in logs]
    for launcher, output in zip(launchers, outputs, strict=True):
        assert launcher.returncode == 0, output[-3000:]
    assert "Starting with 2 processes" in outputs[0]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]  # node 1 ran global rank 1

    [best] = (tmp_path / "runs" / "quickstart" / "version_0").glob("checkpoints/epoch=*.ckpt")
    stored = load(best)
    assert stored["global_step"] == 3
    result = run_cli("validate", "--config", QUICKSTART, "--ckpt_path", str(best), *QUIET).check()
    # The fit's 2-rank validation scored the same weights the one process scores now.
    assert logged_metric(result.stdout, "val/acc1") == pytest.approx(
        best_val_acc1(stored), abs=1e-6
    )


def test_eval_loaders_give_each_image_to_exactly_one_rank():
    ddp = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)  # not launched
    shards = []
    for rank in (0, 1):
        data = DigitsDataModule(val_fraction=0.2006, batch_size=45)
        data.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": rank})
        data.setup("validate")
        loader = data.val_dataloader()
        assert not ddp._data_connector._requires_distributed_sampler(loader)  # Lightning keeps it
        shards.append(list(loader.sampler))
    assert [len(shard) for shard in shards] == [181, 180]  # no padding
    assert sorted(shards[0] + shards[1]) == list(range(361))


@pytest.mark.slow
def test_ddp_validate_matches_one_process_on_an_uneven_val_split(run_cli, ddp_run, tmp_path):
    data = DigitsDataModule(val_fraction=0.2006)
    data.setup("validate")
    assert len(data.val_set) % 2 == 1  # the two ranks get different numbers of images

    # A checkpoint outside a run folder: results go to ./runs/<name>/validate/<file stem>/.
    ckpt = shutil.copy(ddp_run[0] / "checkpoints" / "last.ckpt", tmp_path / "ddp.ckpt")
    results = tmp_path / "runs" / "quickstart" / "validate" / "ddp" / "validate_results.json"
    args = ["validate", "--config", QUICKSTART, *ODD_VAL, *QUIET, "--ckpt_path", str(ckpt)]
    one = logged_metric(run_cli(*args).check().stdout, "val/acc1")
    one_process = json.loads(results.read_text())
    two = run_separately(*args, *TWO_PROCESSES, cwd=tmp_path)
    assert "Starting with 2 processes" in two.stdout + two.stderr
    assert logged_metric(two.stdout, "val/acc1") == pytest.approx(one, abs=1e-6)
    two_processes = json.loads(results.read_text())  # one file, images summed over ranks
    assert one_process["images"] == two_processes["images"] == 361
    assert one_process["top1"] == pytest.approx(two_processes["top1"], abs=1e-6)


@pytest.mark.slow
def test_ddp_predict_writes_one_csv_of_every_image(ddp_run, tmp_path, mixed_image_folder):
    ckpt = shutil.copy(ddp_run[0] / "checkpoints" / "last.ckpt", tmp_path / "ddp.ckpt")
    run_separately("predict", "--config", QUICKSTART, *TWO_PROCESSES, *QUIET,
            "--ckpt_path", str(ckpt),
            "--data.predict_dir", str(mixed_image_folder.path), cwd=tmp_path)  # fmt: skip
    written = sorted(tmp_path.glob("runs/quickstart/predict/ddp/*.csv"))
    assert [path.name for path in written] == ["predictions.csv", "predictions_skipped.csv"]
    csv_file = written[0]
    with csv_file.open() as f:
        assert [row["file"] for row in csv.DictReader(f)] == mixed_image_folder.good
    with (csv_file.parent / "predictions_skipped.csv").open() as f:
        assert sorted(row["file"] for row in csv.DictReader(f)) == mixed_image_folder.bad


@pytest.mark.slow
def test_resume_on_another_world_size(run_cli, ddp_run, tmp_path):
    """DDP checkpoint -> one process -> DDP again, each continuing the stored loop state."""
    written_by_ddp = tmp_path / "ddp.ckpt"
    shutil.copy(ddp_run[0] / "checkpoints" / "last.ckpt", written_by_ddp)
    start = loop_state(written_by_ddp)
    two_steps = ["--trainer.limit_train_batches", "2"]

    run_cli("fit", "--config", QUICKSTART, "--ckpt_path", str(written_by_ddp), *SHORT, *two_steps,
            "--trainer.max_epochs", str(start[0] + 2)).check()  # fmt: skip
    last = tmp_path / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    single = loop_state(last)
    # One more epoch of 2 steps; from scratch it would be 2 epochs, 4 steps in all.
    assert single == (start[0] + 1, start[1] + 2)

    run_separately("fit", "--config", QUICKSTART, "--ckpt_path", str(last), *TWO_PROCESSES,
                   *SHORT, *two_steps, "--trainer.max_epochs", str(start[0] + 3),
                   cwd=tmp_path)  # fmt: skip
    assert loop_state(last) == (single[0] + 1, single[1] + 2)  # resumed in place: same folder


# -------------------------------------------------------------------------- SyncBatchNorm
def trained_tiny() -> nn.Module:
    """refiner_vit_tiny after two training-mode passes, so running statistics are not trivial."""
    torch.manual_seed(0)
    model = timm.create_model("refiner_vit_tiny").train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, 32, 32))
    return model


@pytest.mark.parametrize("switch", ["set_grad_checkpointing", "set_refiner_checkpointing"])
def test_sync_batchnorm_model_computes_the_same_function(switch):
    """`trainer.sync_batchnorm: true` applies Lightning's TorchSyncBatchNorm, which swaps every
    BatchNorm, the refiners' included, for SyncBatchNorm. The eval-time BatchNorm folding and
    the BatchNorm-exact checkpointing must still hold. (Training SyncBatchNorm under DDP needs
    GPUs: torch refuses it on the CPU; outside a process group it normalises locally.)"""
    model = trained_tiny()
    synced = TorchSyncBatchNorm().apply(deepcopy(model))
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) > 4
    assert isinstance(synced.blocks[1].attn.refiner.expand_bn, nn.SyncBatchNorm)

    x = torch.randn(4, 3, 32, 32)
    model.eval()
    synced.eval()
    maps = torch.rand(4, 4, 65, 65)
    assert fast_refiner.refine_path(synced.blocks[1].attn, maps) == "folded"  # eval keeps it
    with torch.no_grad():
        torch.testing.assert_close(synced(x), model(x))

    model.train()
    synced.train()
    getattr(synced, switch)(True)
    model(x).sum().backward()
    synced(x).sum().backward()
    for (name, a), b in zip(model.state_dict().items(), synced.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)  # running statistics updated once
    # The plain model trains through the fused refiner, the synced one through its modules:
    # two float32 paths, each ~1e-4 of the gradient's scale from a float64 run.
    for (name, a), b in zip(model.named_parameters(), synced.parameters(), strict=True):
        scale = b.grad.abs().max().item()
        torch.testing.assert_close(a.grad, b.grad, atol=1e-3 * scale + 1e-6, rtol=0, msg=name)


# ----------------------------------------------------------------------------------- FSDP
FSDP_CONFIG = REPO / "configs" / "trainer" / "fsdp_bf16.yaml"


def test_fsdp_config_shards_each_block():
    """Lightning runs FSDP on CUDA only, so here the config's strategy is built (as the CLI
    builds it, with jsonargparse) and its wrap policy asked which modules become units."""
    config = yaml.safe_load(FSDP_CONFIG.read_text())
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    strategy = parser.instantiate_classes(
        parser.parse_object({"strategy": config["strategy"]})
    ).strategy
    assert isinstance(strategy, FSDPStrategy)
    assert config["precision"] == "bf16-mixed"
    # Checkpointing is the model's grad_checkpointing (BatchNorm-exact), not Lightning's.
    assert "activation_checkpointing_policy" not in config["strategy"]["init_args"]

    policy = strategy.kwargs["auto_wrap_policy"]
    model = timm.create_model("refiner_vit_tiny")
    units = [
        name for name, m in model.named_modules() if policy(m, recurse=False, nonwrapped_numel=0)
    ]
    assert units == [f"blocks.{i}" for i in range(len(model.blocks))]


def test_fsdp_launch_for_the_448_fine_tuning_composes(capsys):
    """The documented FSDP launch: the 448 px recipe with the FSDP trainer layered on top."""
    args = ["fit", *imagenet_recipe("finetune_refiner_vit_l_448")]
    args += ["--trainer", str(FSDP_CONFIG), "--ema", "null", "--print_config"]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code in (None, 0)
    config = yaml.safe_load(capsys.readouterr().out)
    strategy = config["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.FSDPStrategy"
    assert strategy["init_args"]["auto_wrap_policy"] == [
        "refiner_pl.models.refiner_vit.RefinerBlock"
    ]
    assert config["trainer"]["max_epochs"] == 30  # the recipe's schedule stays
    assert config["model"]["init_args"]["grad_checkpointing"] is True
    assert config["ema"] is None


@pytest.mark.slow
def test_fsdp_sharded_blocks_compute_the_unsharded_model(tmp_path):
    """torch FSDP runs on the CPU (Lightning's strategy does not): shard the blocks as the
    config does, with mixed precision set as Lightning always sets it (that makes every
    BatchNorm its own unit), and compare with the plain model on 2 gloo processes."""
    port = str(free_port())
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_addr", "127.0.0.1", "--master_port", port, __file__, str(tmp_path)]
    result = subprocess.run(
        command, cwd=REPO, env=single_thread_env(), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for grad_checkpointing in (False, True):
            eval_logits, loss, grads, tracked = out[grad_checkpointing]
            torch.testing.assert_close(eval_logits, out["plain"][0])  # folded or not, same
            torch.testing.assert_close(loss, out["plain"][1])
            assert tracked == out["plain"][3]  # BatchNorm statistics counted once per step
        for a, b in zip(out[False][2], out[True][2], strict=True):
            torch.testing.assert_close(a, b)  # checkpointing recomputes the same gradients


def _fsdp_worker(out_dir: Path) -> None:
    """One rank: eval logits, train loss, full gradients and BatchNorm step counts of the
    plain model and of FSDP-sharded copies without and with grad checkpointing."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    base = trained_tiny()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))[rank::2]
    fp32 = MixedPrecision(torch.float32, torch.float32, torch.float32)

    def step(model: nn.Module, gradients) -> tuple:
        loss = model.train()(x).logsumexp(-1).mean()
        loss.backward()
        tracked = [int(b) for n, b in model.named_buffers() if n.endswith("num_batches_tracked")]
        with torch.no_grad():  # after a step, as validation in fit: the units are resharded
            eval_logits = model.eval()(x)
        return eval_logits, loss.detach(), gradients(), tracked

    plain = deepcopy(base)
    out = {"plain": step(plain, lambda: [p.grad.clone() for p in plain.parameters()])}
    for grad_checkpointing in (False, True):
        model = deepcopy(base)
        model.set_grad_checkpointing(grad_checkpointing)
        sharded = FullyShardedDataParallel(
            model,
            auto_wrap_policy=ModuleWrapPolicy({RefinerBlock}),
            mixed_precision=fp32,
            device_id=torch.device("cpu"),
            use_orig_params=True,
        )

        def full_grads(sharded=sharded):
            with FullyShardedDataParallel.summon_full_params(sharded, with_grads=True):
                return [p.grad.clone() for p in sharded.parameters()]

        out[grad_checkpointing] = step(sharded, full_grads)
    torch.save(out, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":  # launched by test_fsdp_sharded_blocks_compute_the_unsharded_model
    _fsdp_worker(Path(sys.argv[1]))
