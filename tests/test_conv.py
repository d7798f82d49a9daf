"""Convolutions in half precision on a CPU (``mmvit3.ops.conv``): the
gradients aten computes slowly in half precision go through float32, and
agree with float64 autograd and with aten's own half-precision kernels."""
import pytest
import torch
import torch.nn.functional as F

from mmvit3.models.hvit3 import Block, Downsample, Stem
from mmvit3.ops import conv
from mmvit3.ops.conv import HalfConv2d, conv2d, slow_half_grads

# Relative to the largest value: the inputs are rounded to the half dtype
# once, the float64 reference sees the rounded values.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 2e-3}

ROUTED = HalfConv2d.__name__ + 'Backward'

# (in channels, out channels, kernel, stride, groups)
CONVS = {
    'dense 3x3': (8, 16, 3, 1, 1),
    'dense 3x3 stride 2': (8, 16, 3, 2, 1),
    'pointwise': (16, 24, 1, 1, 1),
    'depthwise': (24, 24, 3, 1, 24),
    'depthwise stride 2': (24, 24, 3, 2, 24),
}


def graph_nodes(node) -> set:
    """Names of the autograd nodes ``node`` reaches."""
    seen, todo = set(), [node]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo += [next_node for next_node, _ in node.next_functions]
    return {node.name() for node in seen}


def max_relative_error(actual, expected):
    return ((actual.double() - expected).abs().max() /
            expected.abs().max()).item()


def test_slow_gradients_are_those_measured():
    """fp16: every weight gradient and depthwise input gradients; bf16:
    strided depthwise input gradients only; float32: none."""
    half, bf16 = torch.float16, torch.bfloat16
    assert slow_half_grads(half, False, (1, 1)) == (False, True)
    assert slow_half_grads(half, True, (1, 1)) == (True, True)
    assert slow_half_grads(bf16, True, (2, 2)) == (True, False)
    assert slow_half_grads(bf16, True, (1, 1)) == (False, False)
    assert slow_half_grads(bf16, False, (2, 2)) == (False, False)
    assert slow_half_grads(torch.float32, True, (2, 2)) == (False, False)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('kind', CONVS)
@pytest.mark.parametrize('size', [(8, 8), (9, 6)])
def test_half_precision_gradients_match_float64(monkeypatch, dtype, kind,
                                                size):
    torch.manual_seed(0)
    aten_backward = torch.ops.aten.convolution_backward
    conv_transpose2d = F.conv_transpose2d
    computed_in = {}  # gradient index -> the dtype it was computed in

    def recording_backward(*args):
        for i, wanted in enumerate(args[-1]):
            if wanted:
                computed_in[i] = args[1].dtype
        return aten_backward(*args)

    def recording_transpose(grad_out, *args):
        computed_in[0] = grad_out.dtype
        return conv_transpose2d(grad_out, *args)

    monkeypatch.setattr(torch.ops.aten, 'convolution_backward',
                        recording_backward)
    monkeypatch.setattr(F, 'conv_transpose2d', recording_transpose)
    in_channels, out_channels, kernel, stride, groups = CONVS[kind]
    x = torch.randn(2, in_channels, *size).to(dtype).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    weight = (torch.randn(out_channels, in_channels // groups, kernel,
                          kernel) * 0.3).to(dtype).requires_grad_()
    bias = torch.randn(out_channels).to(dtype).requires_grad_()
    geometry = (stride, stride), (kernel // 2, kernel // 2), groups
    out = conv2d(x, weight, bias, *geometry)
    routed = any(slow_half_grads(dtype, groups > 1, geometry[0]))
    assert (out.grad_fn.name() == ROUTED) == routed
    assert routed == (dtype == torch.float16 or kind == 'depthwise stride 2')
    grad_out = torch.randn(out.shape).to(dtype)
    grads = torch.autograd.grad(out, (x, weight, bias), grad_out)
    if routed:
        slow_input, slow_params = slow_half_grads(dtype, groups > 1,
                                                  geometry[0])
        float32 = torch.float32
        assert computed_in == {
            0: float32 if slow_input else dtype,
            1: float32 if slow_params else dtype,
            2: float32 if slow_params else dtype,
        }

    inputs64 = [t.detach().double().requires_grad_() for t in (x, weight,
                                                               bias)]
    expected = F.conv2d(*inputs64, *geometry[:2], 1, groups)
    expected_grads = torch.autograd.grad(expected, inputs64,
                                         grad_out.double())
    assert max_relative_error(out, expected) < TOLERANCE[dtype]
    for grad, reference, tensor in zip(grads, expected_grads, (x, weight,
                                                               bias)):
        assert grad.dtype == dtype and grad.shape == tensor.shape
        assert max_relative_error(grad, reference) < TOLERANCE[dtype]


def test_autocast_casts_like_conv2d_and_float32_stays_on_aten():
    x = torch.randn(1, 8, 6, 6, requires_grad=True)
    weight = torch.randn(8, 1, 3, 3, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = conv2d(x, weight, None, (2, 2), (1, 1), 8)
    assert out.dtype == torch.bfloat16
    assert out.grad_fn.name() == ROUTED
    out.float().sum().backward()
    assert x.grad.dtype == weight.grad.dtype == torch.float32
    # float32 keeps aten's own kernels, and so does inference
    out = conv2d(x, weight, None, (2, 2), (1, 1), 8)
    assert out.grad_fn.name() == 'ConvolutionBackward0'
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.float16):
        assert conv2d(x, weight, None, (2, 2), (1, 1), 8).grad_fn is None


def block_step(block, x):
    return block(x.flatten(2).transpose(1, 2), *x.shape[2:])


@pytest.mark.parametrize('dtype, make_layer, step, in_shape', [
    (torch.bfloat16, lambda: Downsample(16, 32), None, (2, 16, 15, 12)),
    (torch.float16, lambda: Downsample(16, 32), None, (2, 16, 15, 12)),
    (torch.float16, lambda: Stem(3, 32), None, (2, 3, 30, 34)),
    (torch.float16, lambda: Block(32), block_step, (2, 32, 7, 9)),
],
                         ids=['downsample-bf16', 'downsample-fp16',
                              'stem-fp16', 'block-fp16'])
def test_layers_under_autocast_match_atens_kernels(monkeypatch, dtype,
                                                   make_layer, step,
                                                   in_shape):
    """The backbone's layers in training (train-mode BatchNorm, the CPE,
    the fused MLP's depthwise gradient) take the float32 route, and get the
    gradients of aten's (slow) half-precision kernels."""
    torch.manual_seed(0)
    layer = make_layer().train()
    step = step or (lambda module, x: module(x))
    x = torch.randn(in_shape)
    results, grad_out = [], None
    for routed in (True, False):
        if not routed:
            monkeypatch.setattr(conv, 'HALF_DTYPES', ())
        layer.zero_grad(set_to_none=True)
        x_in = x.clone().requires_grad_()
        with torch.autocast('cpu', dtype=dtype):
            out = step(layer, x_in)
        assert (ROUTED in graph_nodes(out.grad_fn)) == routed
        if grad_out is None:
            grad_out = torch.randn(out.shape)
        out.float().backward(grad_out)
        results.append([out.float(), x_in.grad] +
                       [p.grad for p in layer.parameters()])
    for ours, atens in zip(*results):
        assert ours.dtype == atens.dtype
        assert max_relative_error(ours, atens.double()) < 1e-2
