"""Mixed precision: the backbone under fp16 / bf16 autocast against float32.

mmengine's AmpOptimWrapper trains on GPUs only, so the whole-backbone checks
at 1333 x 800 run on a GPU; the inner step's float32 guarantee is checked on
every device. The TTT inner step runs in float32 under autocast, so only the
surrounding layers see reduced precision.

Stated tolerances, as relative L2 errors against float32 (measured with
random initialisation, eval-mode BatchNorm, a loss scale of 1024):
- bf16: outputs 3 % (measured about 1 %), all gradients 10 % (about 5 % at
  1333 x 800);
- fp16: outputs 0.5 % (about 0.1 %), all gradients 3 % (about 1 %).
Train-mode BatchNorm on a single image is left out: the gradients of the
convolutions feeding it cancel almost exactly, in any network.
"""
import pytest
import torch

from mmvit3.models import HViT3Backbone
from mmvit3.ops import ttt_inner_step
from mmvit3.testing import DEVICES, relative_error, requires_cuda

TOLERANCES = {
    torch.bfloat16: dict(outputs=0.03, grads=0.10),
    torch.float16: dict(outputs=0.005, grads=0.03),
}
LOSS_SCALE = 1024.  # as a GradScaler would, so fp16 gradients do not flush


def run_backbone(model, image, weights, dtype):
    model.zero_grad(set_to_none=True)
    with torch.autocast(image.device.type, dtype=dtype,
                        enabled=dtype is not None):
        outs = model(image)
    loss = sum((out.float() * weight).mean()
               for out, weight in zip(outs, weights))
    (loss * LOSS_SCALE).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return [out.detach().float() for out in outs], grads


def check_against_float32(device, dtype, height, width):
    model = HViT3Backbone('tiny', drop_path_rate=0.).to(device).eval()
    image = torch.randn(1, 3, height, width, device=device)
    with torch.no_grad():
        weights = [torch.randn_like(out) for out in model(image)]
    ref_outs, ref_grads = run_backbone(model, image, weights, None)
    outs, grads = run_backbone(model, image, weights, dtype)
    tolerance = TOLERANCES[dtype]
    for out, ref in zip(outs, ref_outs):
        assert torch.isfinite(out).all()
        assert relative_error(out, ref, 2) <= tolerance['outputs']
    assert torch.isfinite(grads).all()
    assert relative_error(grads, ref_grads, 2) <= tolerance['grads']


@requires_cuda
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16],
                         ids=['fp16', 'bf16'])
def test_autocast_at_1333x800(dtype):
    check_against_float32('cuda', dtype, 800, 1333)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16],
                         ids=['fp16', 'bf16'])
@pytest.mark.parametrize('device', DEVICES)
def test_inner_step_runs_in_float32(dtype, device):
    """Reduced-precision q, k, v give the float32 result on those values,
    rounded once at the output, even where reduced-precision sums would
    overflow (fp16) or lose the inner gradient (bf16)."""
    heads, dim, head_dim, height, width = 2, 64, 32, 40, 48
    # keys and values of magnitude 300: sums over 1920 tokens pass 65504
    qkv = (torch.randn(1, height * width, 3 * (dim + head_dim)) *
           300).to(device, dtype).requires_grad_()
    inner = [(torch.randn(*shape, device=device) * 0.02).requires_grad_()
             for shape in [(1, heads, head_dim, head_dim)] * 2 +
             [(head_dim, 1, 3, 3)]]
    with torch.autocast(device, dtype=dtype):
        out = ttt_inner_step(qkv, *inner, heads, height, width, 1 / 3)
    assert out.dtype == dtype
    qkv32 = qkv.detach().float().requires_grad_()
    expected = ttt_inner_step(qkv32, *inner, heads, height, width,
                              1 / 3)
    # One unit in the last place, plus the float32 result's own rounding
    # noise (its terms reach 1e6 here): float32 kernels (compiled, or eager
    # once other tests filled Dynamo's cache) differ in their last bits, and
    # that moves some roundings. Half-precision sums would be off by far
    # more (by 2 ** -8 of the largest term in bf16) or overflow (fp16).
    torch.testing.assert_close(
        out, expected.detach().to(dtype), rtol=torch.finfo(dtype).eps,
        atol=1e-6 * expected.abs().max().item())
    grad_out = torch.randn_like(expected)
    grads = torch.autograd.grad(out, [qkv] + inner, grad_out.to(dtype))
    expected_grads = torch.autograd.grad(expected, [qkv32] + inner,
                                         grad_out.to(dtype).float())
    assert grads[0].dtype == dtype
    for got, want in zip(grads, expected_grads):
        assert torch.isfinite(got).all()
        # the qkv gradient is rounded once to the input dtype
        assert relative_error(got, want, 2) < 1e-2
