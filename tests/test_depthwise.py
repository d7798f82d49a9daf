"""Strided depthwise convolutions (``mmvit3.ops.depthwise.depthwise_conv2d``)
in half precision on a CPU, against float64 autograd."""
import pytest
import torch
import torch.nn.functional as F

from mmvit3.models.hvit3 import Downsample
from mmvit3.ops import depthwise
from mmvit3.ops.depthwise import StridedDepthwiseConv, depthwise_conv2d

# Relative to the largest value: the inputs are rounded to the half dtype
# once, the float64 reference sees the rounded values.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 2e-3}


STRIDED = StridedDepthwiseConv.__name__ + 'Backward'


def graph_nodes(node) -> set:
    """Names of the autograd nodes ``node`` reaches."""
    names, todo = set(), [node]
    while todo:
        node = todo.pop()
        if node is not None and node.name() not in names:
            names.add(node.name())
            todo += [next_node for next_node, _ in node.next_functions]
    return names


def max_relative_error(actual, expected):
    return ((actual.double() - expected).abs().max() /
            expected.abs().max()).item()


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('size', [(8, 8), (9, 6), (7, 11)])
def test_half_precision_gradients_match_float64(dtype, size):
    torch.manual_seed(0)
    channels = 24
    x = torch.randn(2, channels, *size).to(dtype).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(channels, 1, 3, 3).to(dtype).requires_grad_()
    bias = torch.randn(channels).to(dtype).requires_grad_()
    out = depthwise_conv2d(x, weight, bias, (2, 2), (1, 1))
    assert out.grad_fn.name() == STRIDED
    grad_out = torch.randn(out.shape).to(dtype)
    grads = torch.autograd.grad(out, (x, weight, bias), grad_out)

    inputs64 = [t.detach().double().requires_grad_() for t in (x, weight,
                                                               bias)]
    expected = F.conv2d(*inputs64, 2, 1, groups=channels)
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
        out = depthwise_conv2d(x, weight, None, (2, 2), (1, 1))
    assert out.dtype == torch.bfloat16
    assert out.grad_fn.name() == STRIDED
    out.float().sum().backward()
    assert x.grad.dtype == weight.grad.dtype == torch.float32
    # float32, and stride 1, keep aten's own kernels
    for stride in ((2, 2), (1, 1)):
        out = depthwise_conv2d(x, weight, None, stride, (1, 1))
        assert out.grad_fn.name() == 'ConvolutionBackward0'


def test_downsampling_under_bf16_autocast_matches_atens_kernels(
        monkeypatch):
    """The backbone's downsampling layers take it in training, and get the
    gradients of aten's (slow) half-precision kernels."""
    torch.manual_seed(0)
    layer = Downsample(16, 32).train()
    x = torch.randn(2, 16, 15, 12)
    grad_out = torch.randn(2, 32, 8, 6)
    results = []
    for routed in (True, False):
        if not routed:
            monkeypatch.setattr(depthwise, 'HALF_DTYPES', ())
        layer.zero_grad(set_to_none=True)
        x_in = x.clone().requires_grad_()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = layer(x_in)
        assert (STRIDED in graph_nodes(out.grad_fn)) == routed
        out.float().backward(grad_out)
        results.append([out.float(), x_in.grad] +
                       [p.grad for p in layer.parameters()])
    for ours, atens in zip(*results):
        assert max_relative_error(ours, atens.double()) < 1e-2
