"""The fused training refiner computes what the BatchNorm modules compute, gradients included."""

import copy

import pytest
import torch
from torch import nn

from refiner_pl.models.refiner_vit import _WORKSPACE, RefinerAttention, _FusedTrainRefine


def attention(dtype: torch.dtype = torch.float32, momentum: float | None = 0.1) -> RefinerAttention:
    torch.manual_seed(0)
    module = RefinerAttention(8, 2, "shared").to(dtype).train()
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):  # non-trivial affine parameters and running stats
            bn.momentum = momentum
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.3, 0.3)
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return module


def maps(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(3, 2, 7, 7, dtype=dtype).softmax(-1)


def test_fused_refiner_passes_gradcheck():
    module = attention(torch.float64)
    refiner, norms = module.refiner, module._norms()
    params = [
        refiner.expand.weight, norms[0].weight, norms[0].bias,
        refiner.local.weight, norms[1].weight, norms[1].bias,
        refiner.reduce.weight, norms[2].weight, norms[2].bias,
        norms[3].weight, norms[3].bias,
    ]  # fmt: skip
    inputs = [torch.rand(2, 2, 5, 5, dtype=torch.float64).softmax(-1).requires_grad_()]
    inputs += [p.detach().clone().requires_grad_() for p in params]

    def fused(attn, *weights):
        return _FusedTrainRefine.apply(attn, module.scale, [1, 1], norms, *weights)

    assert torch.autograd.gradcheck(fused, inputs, fast_mode=True)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_fused_refiner_matches_the_modules_and_their_running_stats(momentum):
    fused, modules = attention(momentum=momentum), attention(momentum=momentum)
    x = maps()
    x_fused, x_modules = x.clone().requires_grad_(), x.clone().requires_grad_()
    for _ in range(2):  # the second step starts from updated running statistics
        out_fused = fused.refine(x_fused)
        out_modules = modules._refine_modules(x_modules)
        torch.testing.assert_close(out_fused, out_modules, atol=1e-5, rtol=1e-5)
        grad = torch.randn_like(out_fused)
        out_fused.backward(grad)
        out_modules.backward(grad)
    torch.testing.assert_close(x_fused.grad, x_modules.grad, atol=1e-4, rtol=1e-4)
    for (name, a), b in zip(fused.named_parameters(), modules.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4, msg=name)
    for (name, a), b in zip(fused.named_buffers(), modules.buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_fused_refiner_is_used_only_for_plain_training_batchnorm():
    module = attention()
    x = maps()
    assert module._fusable(x)
    assert not module._fusable(x.half())
    synced = copy.deepcopy(module)
    synced.adapt_bn = nn.SyncBatchNorm.convert_sync_batchnorm(synced.adapt_bn)
    assert not synced._fusable(x)
    untracked = copy.deepcopy(module)
    untracked.refiner.local_bn.track_running_stats = False
    assert not untracked._fusable(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not module._fusable(x)


def test_two_forwards_before_one_backward_get_their_own_gradients():
    """The fused refiner keeps temporaries in a shared workspace: nothing a first forward
    saved for backward may be overwritten by a second one (of another size, so the
    workspace also grows in between)."""
    fused, modules = attention(), attention()
    small_maps, large_maps = maps(), torch.rand(8, 2, 7, 7).softmax(-1)
    grads = [torch.randn_like(small_maps), torch.randn_like(large_maps)]
    inputs = {}
    for name, refine in (("fused", fused.refine), ("modules", modules._refine_modules)):
        xs = [small_maps.clone().requires_grad_(), large_maps.clone().requires_grad_()]
        outs = [refine(x) for x in xs]
        sum((out * grad).sum() for out, grad in zip(outs, grads, strict=True)).backward()
        inputs[name] = xs
    for x_fused, x_modules in zip(inputs["fused"], inputs["modules"], strict=True):
        torch.testing.assert_close(x_fused.grad, x_modules.grad, atol=1e-4, rtol=1e-4)
    for (name, a), b in zip(fused.named_parameters(), modules.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_training_after_inference_mode_evaluation():
    """Workspace tensors made under inference_mode cannot be written outside it: validation
    under inference_mode followed by a training step must still work."""
    module = attention().eval()
    _WORKSPACE.buffers.clear()  # so that inference_mode makes the first workspace tensors
    with torch.inference_mode():
        module.refine(maps())
    module.train()
    x = maps().requires_grad_()
    module.refine(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
