"""The fast TTT path against the plain oracle (``mmvit3.ops.ttt``).

The plain path is the spec in torch ops and is itself checked against
autograd and a literal reading of the spec in ``test_ttt_math.py``; here the
fast path must give the same outputs and gradients.
"""
import pytest
import torch

import mmvit3.ops.ttt_fast as ttt_fast
from conftest import DEVICES, backbone_outputs_and_grads
from mmvit3.models import HViT3
from mmvit3.models.hvit3 import TTT
from mmvit3.ops import fast_ttt


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_layer(dim: int, dtype=torch.float64, inner_std: float = 0.3):
    layer = TTT(dim).to(dtype)
    # Larger inner weights than the 0.02 init, so that the inner step, its
    # clipping and its second-order terms all matter.
    with torch.no_grad():
        for weight in (layer.w1, layer.w2, layer.w3):
            weight.normal_(0, inner_std)
    return layer


def outputs_and_grads(layer: TTT, impl: str, x, height, width, grad_out=None):
    layer.impl = impl
    x = x.detach().clone().requires_grad_()
    out = layer(x, height, width)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    params = [layer.w1, layer.w2, layer.w3, layer.qkv.weight, layer.qkv.bias,
              layer.proj.weight]
    grads = torch.autograd.grad(out, [x] + params, grad_out)
    return out, grads, grad_out


def set_chunk_elements(monkeypatch, elements: int):
    for name in ('CPU_CHUNK_ELEMENTS', 'GPU_CHUNK_ELEMENTS'):
        monkeypatch.setattr(ttt_fast, name, elements)


def assert_paths_agree(layer, x, height, width, tolerance):
    """Largest difference between the paths, relative to the largest
    magnitude of each tensor, at most ``tolerance``."""
    plain, plain_grads, grad_out = outputs_and_grads(layer, 'plain', x,
                                                     height, width)
    fast, fast_grads, _ = outputs_and_grads(layer, 'fast', x, height, width,
                                            grad_out)
    names = ['out', 'x', 'w1', 'w2', 'w3', 'qkv.weight', 'qkv.bias',
             'proj.weight']
    for name, got, expected in zip(names, (fast, ) + fast_grads,
                                   (plain, ) + plain_grads):
        error = (got - expected).abs().max() / expected.abs().max()
        assert error <= tolerance, f'{name}: relative error {error:.2e}'


@pytest.mark.parametrize('batch,dim,height,width,chunk_elements', [
    (2, 64, 5, 7, 1 << 20),
    # 100 elements: chunks of one or two tokens, every chunk boundary tested
    (2, 64, 5, 7, 100),
    (1, 96, 6, 4, 100),
    (3, 64, 9, 11, 1 << 20),
    (1, 64, 1, 1, 1 << 20),
    (2, 128, 1, 13, 1 << 20),
])
@pytest.mark.parametrize('device', DEVICES)
def test_matches_plain_path_float64(batch, dim, height, width,
                                    chunk_elements, device, monkeypatch):
    set_chunk_elements(monkeypatch, chunk_elements)
    layer = make_layer(dim).to(device)
    x = torch.randn(batch, height * width, dim, dtype=torch.float64,
                    device=device)
    assert_paths_agree(layer, x, height, width, 1e-12)


@pytest.mark.parametrize('inner_std', [0.02, 0.3])
@pytest.mark.parametrize('device', DEVICES)
def test_matches_plain_path_float32(inner_std, device, monkeypatch):
    # Either path is within about 6e-7 of float64 here, by this measure.
    set_chunk_elements(monkeypatch, 4096)
    layer = make_layer(128, torch.float32, inner_std).to(device)
    height, width = 24, 20
    x = torch.randn(2, height * width, 128, device=device)
    assert_paths_agree(layer, x, height, width, 1e-5)


def test_gradcheck_fast_inner_step():
    heads, dim, head_dim, height, width = 2, 64, 32, 2, 3
    qkv = torch.randn(1, height * width, 3 * (dim + head_dim),
                      dtype=torch.float64, requires_grad=True)
    inner = [
        (torch.randn(*shape, dtype=torch.float64) * 0.3).requires_grad_()
        for shape in [(1, heads, head_dim, head_dim)] * 2 +
        [(head_dim, 1, 3, 3)]
    ]

    def fn(qkv, w1, w2, w3):
        return fast_ttt(qkv, w1, w2, w3, heads, height, width, 1 / 3)

    assert torch.autograd.gradcheck(
        fn, (qkv, *inner), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize('device', DEVICES)
def test_whole_backbone_fast_equals_plain(device):
    model = HViT3(
        dict(dims=(32, 64), depths=(2, 1)),
        drop_path_rate=0.,
        out_indices=(0, 1))
    model = model.double().to(device)
    image = torch.randn(2, 3, 29, 22, dtype=torch.float64, device=device)
    results = []
    for impl in ('plain', 'fast'):
        assert TTT.set_impl(model, impl) == 3
        results.append(backbone_outputs_and_grads(model, image))
    for plain, fast in zip(*results):
        torch.testing.assert_close(fast, plain, rtol=1e-9, atol=1e-11)


def saved_bytes(module, *args) -> int:
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(*args)
    return sum(storages.values())


def test_fast_path_saves_far_less_for_backward():
    layer = make_layer(64, torch.float32)
    height, width = 32, 32
    x = torch.randn(2, height * width, 64, requires_grad=True)
    layer.impl = 'plain'
    plain = saved_bytes(layer, x, height, width)
    layer.impl = 'fast'
    fast = saved_bytes(layer, x, height, width)
    # x, qkv and the projection's input; the plain path adds a dozen maps
    assert fast < 0.4 * plain, (fast, plain)


def test_inference_mode_then_training():
    """RoPE tables cached under inference mode must serve autograd later."""
    layer = make_layer(64, torch.float32)
    x = torch.randn(1, 6 * 5, 64)
    with torch.inference_mode():
        expected = layer(x, 6, 5)
    x.requires_grad_()
    out = layer(x, 6, 5)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), expected)
    assert x.grad is not None and torch.isfinite(x.grad).all()


class _FixedSize(torch.nn.Module):

    def __init__(self, layer, height, width):
        super().__init__()
        self.layer, self.height, self.width = layer, height, width

    def forward(self, x):
        return self.layer(x, self.height, self.width)


def test_tracing_sees_plain_ops():
    """Tracers see torch ops (the plain path), never the opaque function."""
    module = _FixedSize(make_layer(64, torch.float32), 4, 6)
    x = torch.randn(1, 4 * 6, 64)
    traced = torch.jit.trace(module, (x, ))
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert 'prim::PythonOp' not in kinds
    assert 'aten::matmul' in kinds
    torch.testing.assert_close(traced(x), module(x))


def test_rejects_a_qkv_that_does_not_split():
    with pytest.raises(ValueError, match='tokens do not form'):
        fast_ttt(torch.randn(1, 10, 288), *make_weights(), 2, 3, 4, 1 / 3)
    with pytest.raises(ValueError, match='does not split'):
        fast_ttt(torch.randn(1, 12, 291), *make_weights(), 2, 3, 4, 1 / 3)


def make_weights():
    return (torch.zeros(1, 2, 32, 32), torch.zeros(1, 2, 32, 32),
            torch.zeros(32, 1, 3, 3))


def test_impl_option_is_checked():
    with pytest.raises(ValueError, match='impl'):
        TTT(64, impl='triton')
    with pytest.raises(ValueError, match='impl'):
        TTT.set_impl(TTT(64), 'compiled')
    assert 'plain' in repr(TTT(64, impl='plain'))


def test_double_backward_raises():
    qkv = torch.randn(1, 6, 3 * (64 + 32), dtype=torch.float64,
                      requires_grad=True)
    inner = [
        torch.randn(*shape, dtype=torch.float64)
        for shape in [(1, 2, 32, 32)] * 2 + [(32, 1, 3, 3)]
    ]
    out = fast_ttt(qkv, *inner, 2, 2, 3, 1 / 3)
    grad, = torch.autograd.grad(out.sum(), qkv, create_graph=True)
    with pytest.raises(RuntimeError, match='no autograd formula'):
        grad.sum().backward()
