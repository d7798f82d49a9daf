"""The TTT inner step against autograd and an independent reading of the
spec."""
import math

import torch
import torch.nn.functional as F

from mmvit3.models.hvit3 import TTT
from mmvit3.ops.rope import rope_2d
from mmvit3.ops.ttt import (depthwise_grad, depthwise_ttt, swiglu_grads,
                            swiglu_ttt)

SCALE = 9**-0.5


def test_scale_is_one_third():
    assert math.isclose(SCALE, 1 / 3)
    assert math.isclose(TTT(64).scale, 1 / 3)


def swiglu_loss(k, v, w1, w2):
    f = (k @ w1) * F.silu(k @ w2)
    return -(SCALE / k.shape[-2]) * (v * f).sum()


def test_swiglu_closed_form_equals_autograd():
    k = torch.randn(2, 3, 17, 8, dtype=torch.float64)
    v = torch.randn(2, 3, 17, 8, dtype=torch.float64)
    # per-image weights so that autograd gives per-image gradients
    w1 = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    auto1, auto2 = torch.autograd.grad(swiglu_loss(k, v, w1, w2), (w1, w2))
    g1, g2 = swiglu_grads(k, v, w1, w2, SCALE)
    torch.testing.assert_close(g1, auto1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g2, auto2, rtol=1e-10, atol=1e-12)


def depthwise_loss(k, v, kernels):
    """Per-image depthwise conv with kernels (B, d, 3, 3)."""
    out = torch.stack([
        F.conv2d(k[b:b + 1], kernels[b].unsqueeze(1), padding=1,
                 groups=k.shape[1])[0] for b in range(k.shape[0])
    ])
    return -(SCALE / (k.shape[-2] * k.shape[-1])) * (v * out).sum()


def test_depthwise_closed_form_equals_autograd():
    k = torch.randn(3, 5, 7, 6, dtype=torch.float64)
    v = torch.randn(3, 5, 7, 6, dtype=torch.float64)
    kernels = torch.randn(3, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    (auto, ) = torch.autograd.grad(depthwise_loss(k, v, kernels), kernels)
    torch.testing.assert_close(
        depthwise_grad(k, v, SCALE), auto, rtol=1e-10, atol=1e-12)


def reference_ttt(layer: TTT, x: torch.Tensor, height: int, width: int):
    """The spec read literally: autograd inner steps, complex-number RoPE."""
    batch, n, c = x.shape
    d, h = layer.head_dim, layer.num_heads
    q1, k1, v1, q2, k2, v2 = layer.qkv(x).split([c] * 3 + [d] * 3, dim=-1)

    k_freq = c // 4
    theta = 10000**(-torch.arange(k_freq, dtype=torch.float32) / k_freq)
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float32),
        torch.arange(width, dtype=torch.float32),
        indexing='ij')
    angles = torch.cat([ys.reshape(-1, 1) * theta, xs.reshape(-1, 1) * theta],
                       dim=1)
    # the spec computes the rotations in float32
    rot = torch.complex(angles.cos(), angles.sin()).to(torch.complex128)

    def rope(t):
        z = torch.view_as_complex(t.reshape(batch, n, c // 2, 2).contiguous())
        return torch.view_as_real(z * rot).reshape(batch, n, c)

    def heads(t):
        return t.reshape(batch, n, h, d).transpose(1, 2)

    q, k, v = heads(rope(q1)), heads(rope(k1)), heads(v1)
    w1 = layer.w1.expand(batch, -1, -1, -1)
    w2 = layer.w2.expand(batch, -1, -1, -1)
    g1, g2 = torch.autograd.grad(
        swiglu_loss(k, v, w1, w2), (w1, w2), create_graph=True)
    g1 = g1 / (g1.norm(dim=-2, keepdim=True) + 1)
    g2 = g2 / (g2.norm(dim=-2, keepdim=True) + 1)
    out1 = (q @ (w1 - g1)) * F.silu(q @ (w2 - g2))
    out1 = out1.transpose(1, 2).reshape(batch, n, c)

    def to_map(t):
        return t.transpose(1, 2).reshape(batch, d, height, width)

    kernels = layer.w3.squeeze(1).expand(batch, -1, -1, -1)
    (g, ) = torch.autograd.grad(
        depthwise_loss(to_map(k2), to_map(v2), kernels),
        kernels,
        create_graph=True)
    g = g / (g.flatten(2).norm(dim=-1)[..., None, None] + 1)
    new = kernels - g
    out2 = torch.stack([
        F.conv2d(to_map(q2)[b:b + 1], new[b].unsqueeze(1), padding=1,
                 groups=d)[0] for b in range(batch)
    ])
    out2 = out2.flatten(2).transpose(1, 2)
    return layer.proj(torch.cat([out1, out2], dim=-1))


def test_layer_matches_literal_spec_forward_and_backward():
    layer = TTT(64).double()
    height, width = 5, 7
    x = torch.randn(2, height * width, 64, dtype=torch.float64,
                    requires_grad=True)
    ours = layer(x, height, width)
    ref = reference_ttt(layer, x, height, width)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-11)
    grad_out = torch.randn_like(ours)
    params = [x, layer.w1, layer.w2, layer.w3, layer.qkv.weight]
    ours_g = torch.autograd.grad(ours, params, grad_out)
    ref_g = torch.autograd.grad(ref, params, grad_out)
    for a, b in zip(ours_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_gradcheck_through_whole_layer():
    layer = TTT(64).double()
    # Larger inner weights than the 0.02 init, so the inner step matters.
    with torch.no_grad():
        for w in (layer.w1, layer.w2, layer.w3):
            w.normal_(0, 0.3)
    height, width = 3, 4
    x = torch.randn(1, height * width, 64, dtype=torch.float64,
                    requires_grad=True)
    w1 = layer.w1.detach().clone().requires_grad_()
    w2 = layer.w2.detach().clone().requires_grad_()
    w3 = layer.w3.detach().clone().requires_grad_()

    def fn(x, w1, w2, w3):
        params = {'w1': w1, 'w2': w2, 'w3': w3}
        return torch.func.functional_call(layer, params, (x, height, width))

    assert torch.autograd.gradcheck(
        fn, (x, w1, w2, w3), eps=1e-6, atol=1e-5, fast_mode=True)


def test_outer_gradient_flows_through_inner_step():
    """d out / d v is non-zero only through the inner update."""
    q = torch.randn(1, 1, 6, 4, dtype=torch.float64)
    k = torch.randn(1, 1, 6, 4, dtype=torch.float64)
    v = torch.randn(1, 1, 6, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    (grad_v, ) = torch.autograd.grad(swiglu_ttt(q, k, v, w, w, SCALE).sum(), v)
    assert grad_v.abs().sum() > 0
    qm, km = (torch.randn(1, 2, 4, 4, dtype=torch.float64) for _ in range(2))
    vm = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    w3 = torch.randn(2, 1, 3, 3, dtype=torch.float64)
    (grad_vm, ) = torch.autograd.grad(
        depthwise_ttt(qm, km, vm, w3, SCALE).sum(), vm)
    assert grad_vm.abs().sum() > 0


def test_rope_recomputed_for_any_size_and_norm_preserving():
    for height, width in [(1, 1), (3, 5), (14, 9)]:
        x = torch.randn(2, height * width, 64)
        y = rope_2d(x, height, width)
        torch.testing.assert_close(
            y.unflatten(-1, (-1, 2)).norm(dim=-1),
            x.unflatten(-1, (-1, 2)).norm(dim=-1))
        # position (0, 0) is not rotated
        torch.testing.assert_close(y[:, 0], x[:, 0])


def test_rope_rotates_rows_then_columns():
    x = torch.zeros(1, 2 * 3, 8)
    x[..., 0::2] = 1.0  # every pair = 1 + 0i
    y = rope_2d(x, 2, 3).reshape(2, 3, 4, 2)
    theta = 10000**(-torch.arange(2) / 2)
    # pair 1 turns with the row index (y=1) at theta_1
    torch.testing.assert_close(y[1, 0, 1, 0], torch.cos(theta[1]))
    # pair 2 + k turns with the column index (x=2) at theta_k
    torch.testing.assert_close(y[0, 2, 3, 1], torch.sin(2 * theta[1]))
    torch.testing.assert_close(y[1, 2, 0, 0], torch.cos(theta[0]))
