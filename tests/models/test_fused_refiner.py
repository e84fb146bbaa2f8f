"""The fast CPU kernels compute what the plain modules compute: the switch on against off,
through the public API (``set_fast_refiner``, ``refine_path``, the layers' forwards)."""

import copy
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from refiner_pl.models import RefinerViT, fast_refiner, set_fast_refiner, use_fast_refiner
from refiner_pl.models.refiner_vit import ConvStem, LinearPatchEmbed, RefinerAttention


def with_fast(enabled: bool, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with the fast kernels on or off, the switch restored after."""
    before = use_fast_refiner()
    set_fast_refiner(enabled)
    try:
        return fn(*args, **kwargs)
    finally:
        set_fast_refiner(before)


def randomise_batchnorms(module: nn.Module) -> None:
    """Non-trivial affine parameters and running statistics."""
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.3, 0.3)
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)


def attention(dtype: torch.dtype = torch.float32, momentum: float | None = 0.1) -> RefinerAttention:
    torch.manual_seed(0)
    module = RefinerAttention(8, 2, "shared").to(dtype).train()
    randomise_batchnorms(module)
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.momentum = momentum
    return module


def maps(batch: int = 3, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(batch, 2, 7, 7, dtype=dtype).softmax(-1)


class RefineOnly(nn.Module):
    """A module whose forward is ``attention.refine``, for ``torch.func.functional_call``."""

    def __init__(self, attention: RefinerAttention) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, attn: torch.Tensor) -> torch.Tensor:
        return self.attention.refine(attn)


# ------------------------------------------------------------------ training: fused
def test_fused_refiner_passes_gradcheck():
    wrapper = RefineOnly(attention(torch.float64))
    attn = torch.rand(2, 2, 5, 5, dtype=torch.float64).softmax(-1).requires_grad_()
    assert with_fast(True, fast_refiner.refine_path, wrapper.attention, attn) == "fused"
    names = [n for n, _ in wrapper.named_parameters() if ".refiner." in n or ".adapt_bn." in n]
    params = dict(wrapper.named_parameters())
    values = [params[n].detach().clone().requires_grad_() for n in names]

    def refine(attn: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(wrapper, dict(zip(names, weights, strict=True)), attn)

    assert with_fast(True, torch.autograd.gradcheck, refine, [attn, *values], fast_mode=True)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_fused_refiner_matches_the_modules_and_their_running_stats(momentum):
    fused, modules = attention(momentum=momentum), attention(momentum=momentum)
    x = maps()
    x_fused, x_modules = x.clone().requires_grad_(), x.clone().requires_grad_()
    assert with_fast(True, fast_refiner.refine_path, fused, x_fused) == "fused"
    for _ in range(2):  # the second step starts from updated running statistics
        out_fused = with_fast(True, fused.refine, x_fused)
        out_modules = with_fast(False, modules.refine, x_modules)
        torch.testing.assert_close(out_fused, out_modules, atol=1e-5, rtol=1e-5)
        grad = torch.randn_like(out_fused)
        out_fused.backward(grad)
        out_modules.backward(grad)
    torch.testing.assert_close(x_fused.grad, x_modules.grad, atol=1e-4, rtol=1e-4)
    for (name, a), b in zip(fused.named_parameters(), modules.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4, msg=name)
    for (name, a), b in zip(fused.named_buffers(), modules.buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_each_path_is_used_only_where_it_applies():
    module, x = attention(), maps()
    path = fast_refiner.refine_path
    assert with_fast(True, path, module, x) == "fused"
    assert with_fast(False, path, module, x) == "modules"
    assert with_fast(True, path, module, x.half()) == "modules"
    synced = copy.deepcopy(module)
    synced.adapt_bn = nn.SyncBatchNorm.convert_sync_batchnorm(synced.adapt_bn)
    assert with_fast(True, path, synced, x) == "modules"
    assert with_fast(True, path, synced.eval(), x) == "folded"  # SyncBatchNorm folds in eval
    untracked = copy.deepcopy(module)
    untracked.refiner.local_bn.track_running_stats = False
    assert with_fast(True, path, untracked, x) == "modules"
    assert with_fast(True, path, untracked.eval(), x) == "modules"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert with_fast(True, path, module, x) == "modules"
    assert with_fast(True, path, copy.deepcopy(module).eval(), x) == "folded"


def test_two_forwards_before_one_backward_get_their_own_gradients():
    """The fused refiner keeps temporaries in a shared workspace: nothing a first forward
    saved for backward may be overwritten by a second one (of another size, so the
    workspace also grows in between)."""
    fused, modules = attention(), attention()
    small_maps, large_maps = maps(), maps(batch=8)
    grads = [torch.randn_like(small_maps), torch.randn_like(large_maps)]
    inputs = {}
    for name, module, fast in (("fused", fused, True), ("modules", modules, False)):
        xs = [small_maps.clone().requires_grad_(), large_maps.clone().requires_grad_()]
        outs = [with_fast(fast, module.refine, x) for x in xs]
        sum((out * grad).sum() for out, grad in zip(outs, grads, strict=True)).backward()
        inputs[name] = xs
    for x_fused, x_modules in zip(inputs["fused"], inputs["modules"], strict=True):
        torch.testing.assert_close(x_fused.grad, x_modules.grad, atol=1e-4, rtol=1e-4)
    for (name, a), b in zip(fused.named_parameters(), modules.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_training_after_inference_mode_evaluation():
    """Workspace tensors made under inference_mode cannot be written outside it: validation
    under inference_mode followed by a training step must still work. The workspace is per
    thread, so a fresh thread starts with none and inference_mode makes the first ones."""
    failures: list[BaseException] = []

    def validate_then_train() -> None:
        try:
            module = attention().eval()
            with torch.inference_mode():
                module.refine(maps())
            module.train()
            x = maps().requires_grad_()
            module.refine(x).sum().backward()
            assert x.grad is not None and torch.isfinite(x.grad).all()
        except BaseException as err:  # reported by the test's own thread
            failures.append(err)

    thread = threading.Thread(target=validate_then_train)
    thread.start()
    thread.join()
    assert not failures, failures


# ------------------------------------------------------------------ eval: folded
@pytest.mark.parametrize("chunk_bytes", [fast_refiner.CHUNK_BYTES, 6 * 20 * 20 * 4])
def test_folded_eval_refiner_equals_the_batchnorm_modules(monkeypatch, chunk_bytes):
    """The folded refiner, batch-wide or a few samples at a time (the small budget holds one
    sample's expanded maps), computes the BatchNorm modules' function."""
    monkeypatch.setattr(fast_refiner, "CHUNK_BYTES", chunk_bytes)
    module = attention().eval()
    x = torch.rand(3, 2, 20, 20).softmax(-1)
    assert with_fast(True, fast_refiner.refine_path, module, x) == "folded"
    with torch.no_grad():
        folded = with_fast(True, module.refine, x)
        modules = with_fast(False, module.refine, x)
    torch.testing.assert_close(folded, modules, atol=1e-6, rtol=1e-5)


def test_folded_eval_refiner_runs_under_cpu_autocast():
    module = attention().eval()
    x = torch.rand(2, 2, 17, 17).softmax(-1)
    with torch.no_grad():
        expected = with_fast(False, module.refine, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = with_fast(True, module.refine, x)
    torch.testing.assert_close(out.float(), expected, atol=5e-2, rtol=5e-2)


# ------------------------------------------------------------------ stem
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("size", [32, 36])
def test_patch_projection_as_gemm_equals_the_convolution(size, memory_format):
    """The stride-k projection runs as one GEMM over cut-out patches (NCHW or channels-last);
    sizes it does not divide fall back to the convolution."""
    torch.manual_seed(0)
    embed = LinearPatchEmbed(8, 8, 16)
    x = torch.randn(2, 8, size, size).contiguous(memory_format=memory_format).requires_grad_()
    out, expected = with_fast(True, embed, x), with_fast(False, embed, x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(expected)
    g_x, g_w = torch.autograd.grad(out, (x, embed.proj.weight), grad)
    e_x, e_w = torch.autograd.grad(expected, (x, embed.proj.weight), grad)
    torch.testing.assert_close(g_x, e_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_w, e_w, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("training", [False, True])
def test_conv_stem_fast_path_equals_the_modules(training):
    torch.manual_seed(0)
    stem = ConvStem(16, 3, 32)
    randomise_batchnorms(stem)
    fast, plain = copy.deepcopy(stem).train(training), copy.deepcopy(stem).train(training)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(with_fast(True, fast, x), with_fast(False, plain, x))
    for (name, a), b in zip(fast.named_buffers(), plain.buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


# ------------------------------------------------------------------ the whole model
def test_model_training_step_and_inference_match_with_the_switch_off():
    torch.manual_seed(0)
    fast = RefinerViT(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=4, num_classes=5)
    randomise_batchnorms(fast)
    plain = copy.deepcopy(fast)
    x = torch.randn(4, 3, 32, 32)
    for model, enabled in ((fast, True), (plain, False)):
        with_fast(enabled, lambda m: m.train()(x).logsumexp(-1).sum().backward(), model)
    # two float32 paths, each within ~1e-5 of the gradient's scale from a float64 run
    for (name, a), b in zip(fast.named_parameters(), plain.parameters(), strict=True):
        scale = b.grad.abs().max().item()
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4 * scale + 1e-6, rtol=0, msg=name)
    for (name, a), b in zip(fast.named_buffers(), plain.buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    with torch.no_grad():
        eval_fast = with_fast(True, fast.eval(), x)
        eval_plain = with_fast(False, plain.eval(), x)
    torch.testing.assert_close(eval_fast, eval_plain, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_environment_variable_starts_with_the_kernels_off():
    """REFINER_FAST=0 is read when the package is imported: a fresh interpreter."""
    code = "from refiner_pl.models import use_fast_refiner; print(use_fast_refiner())"
    off = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "REFINER_FAST": "0"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert off.stdout.split()[-1] == "False"
    assert os.environ.get("REFINER_FAST") is None and use_fast_refiner()  # on by default
