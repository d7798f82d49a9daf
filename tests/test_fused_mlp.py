"""The fused MLP (``mmvit3.ops.fused_mlp``) against torch autograd on the
plain ``Mlp`` ops."""
import pytest
import torch

from conftest import DEVICES, backbone_outputs_and_grads
from mmvit3.models import HViT3
from mmvit3.models.hvit3 import TTT, Mlp, set_impl
from mmvit3.ops import fused_mlp
from mmvit3.ops import bands
from mmvit3.ops.fused_mlp import FusedMlp


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_mlp(dim: int, dtype=torch.float64, std: float = 0.5) -> Mlp:
    mlp = Mlp(dim).to(dtype)
    with torch.no_grad():
        # Non-zero biases and a dwc of the size of h, so every term matters.
        for param in mlp.parameters():
            param.normal_(0, std)
    return mlp


def call(mlp: Mlp, x, height, width, recompute_fc1=False):
    return fused_mlp(x, mlp.fc1.weight, mlp.fc1.bias, mlp.dwc.weight,
                     mlp.dwc.bias, mlp.fc2.weight, mlp.fc2.bias, height,
                     width, recompute_fc1)


def outputs_and_grads(mlp, fn, x, grad_out):
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    inputs = [x] + [p for p in mlp.parameters() if p.requires_grad]
    return [out] + list(torch.autograd.grad(out, inputs, grad_out))


def assert_close_relative(got, expected, tolerance):
    for index, (g, e) in enumerate(zip(got, expected)):
        assert g.dtype == e.dtype and g.shape == e.shape, index
        error = (g - e).abs().max() / e.abs().max()
        assert error <= tolerance, f'tensor {index}: relative error {error}'


@pytest.mark.parametrize('recompute_fc1', [False, True])
@pytest.mark.parametrize('batch,dim,height,width', [(2, 8, 5, 7),
                                                   (1, 4, 1, 1),
                                                   (3, 4, 1, 6)])
def test_matches_autograd_float64(batch, dim, height, width, recompute_fc1):
    mlp = make_mlp(dim)
    mlp.impl = 'plain'
    x = torch.randn(batch, height * width, dim, dtype=torch.float64)
    grad_out = torch.randn_like(x)
    expected = outputs_and_grads(mlp, lambda x: mlp(x, height, width), x,
                                 grad_out)
    got = outputs_and_grads(
        mlp, lambda x: call(mlp, x, height, width, recompute_fc1), x,
        grad_out)
    # x and all six parameters
    assert len(got) == 8
    assert_close_relative(got, expected, 1e-10)


@pytest.mark.parametrize('trainable', [['fc2.weight'], ['dwc.bias'],
                                       ['fc1.weight', 'dwc.weight']])
def test_only_some_parameters_trainable(trainable):
    mlp = make_mlp(8)
    for name, param in mlp.named_parameters():
        param.requires_grad_(name in trainable)
    x = torch.randn(2, 15, 8, dtype=torch.float64)
    grad_out = torch.randn_like(x)
    mlp.impl = 'plain'
    expected = outputs_and_grads(mlp, lambda x: mlp(x, 3, 5), x, grad_out)
    # x itself does not require grad here.
    out = call(mlp, x, 3, 5)
    params = [p for p in mlp.parameters() if p.requires_grad]
    got = [out] + list(torch.autograd.grad(out, params, grad_out))
    assert_close_relative(got, [expected[0]] + expected[2:], 1e-10)


@pytest.mark.parametrize('recompute_fc1', [False, True])
def test_gradcheck(recompute_fc1):
    height, width = 2, 3
    mlp = make_mlp(2)
    x = torch.randn(1, height * width, 2, dtype=torch.float64,
                    requires_grad=True)

    def fn(x, *params):
        return fused_mlp(x, *params, height, width, recompute_fc1)

    assert torch.autograd.gradcheck(fn, (x, *mlp.parameters()))


def test_matches_autograd_float32():
    mlp = make_mlp(32, torch.float32, std=0.1)
    height, width = 12, 10
    x = torch.randn(2, height * width, 32)
    grad_out = torch.randn_like(x)
    mlp.impl = 'plain'
    expected = outputs_and_grads(mlp, lambda x: mlp(x, height, width), x,
                                 grad_out)
    got = outputs_and_grads(mlp, lambda x: call(mlp, x, height, width), x,
                            grad_out)
    assert_close_relative(got, expected, 1e-5)


@pytest.mark.parametrize('device', DEVICES)
def test_backbone_fast_equals_plain(device, monkeypatch):
    model = HViT3(
        dict(dims=(32, 64), depths=(1, 1)),
        out_indices=(0, 1)).double().to(device)
    image = torch.randn(2, 3, 64, 64, dtype=torch.float64, device=device)
    calls = []
    apply = FusedMlp.apply
    monkeypatch.setattr(FusedMlp, 'apply',
                        lambda *args: calls.append(1) or apply(*args))
    results = []
    for impl in ('plain', 'fast'):
        assert Mlp.set_impl(model, impl) == 2
        results.append(backbone_outputs_and_grads(model, image))
    assert len(calls) == 2
    for plain, fast in zip(*results):
        torch.testing.assert_close(fast, plain, rtol=1e-9, atol=1e-11)


def test_bfloat16_autocast_cpu():
    mlp = make_mlp(32, torch.float32, std=0.1)
    height, width = 8, 6
    x = torch.randn(2, height * width, 32)
    results = []
    for impl in ('plain', 'fast'):
        mlp.impl = impl
        mlp.zero_grad(set_to_none=True)
        x_in = x.clone().requires_grad_()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = mlp(x_in, height, width)
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
        results.append([out.float(), x_in.grad] +
                       [p.grad for p in mlp.parameters()])
    for plain, fast in zip(*results):
        assert torch.isfinite(fast).all()
        assert fast.dtype == plain.dtype
        error = (fast - plain).abs().max() / plain.abs().max()
        assert error < 3e-2, error


def saved_tensors(fn):
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def test_no_grad_saves_nothing(monkeypatch):
    mlp = make_mlp(8, torch.float32)
    x = torch.randn(2, 20, 8)
    mlp.impl = 'plain'
    with torch.no_grad():
        expected = mlp(x, 4, 5)
    calls = []
    apply = FusedMlp.apply
    monkeypatch.setattr(FusedMlp, 'apply',
                        lambda *args: calls.append(1) or apply(*args))
    mlp.impl = 'fast'
    with torch.no_grad():
        out, saved = saved_tensors(lambda: mlp(x, 4, 5))
        direct, direct_saved = saved_tensors(lambda: call(mlp, x, 4, 5))
    assert not saved and not direct_saved and not calls
    assert out.grad_fn is None and direct.grad_fn is None
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(direct, expected)
    # Grad mode on, but nothing requires grad: no graph either.
    mlp.requires_grad_(False)
    out, saved = saved_tensors(lambda: call(mlp, x, 4, 5))
    assert not saved and out.grad_fn is None and not calls
    torch.testing.assert_close(out, expected)


def saved_bytes(fn) -> int:
    _, saved = saved_tensors(fn)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in saved}
    return sum(storages.values())


def test_saves_far_less_for_backward():
    mlp = make_mlp(16, torch.float32)
    height, width = 16, 16
    x = torch.randn(2, height * width, 16, requires_grad=True)
    map_bytes = x.numel() * 4 * 4
    weight_bytes = sum(p.numel() * 4 for p in mlp.parameters())
    mlp.impl = 'plain'
    plain = saved_bytes(lambda: mlp(x, height, width))
    lean = saved_bytes(lambda: call(mlp, x, height, width))
    leaner = saved_bytes(lambda: call(mlp, x, height, width, True))
    # autograd: x and four 4C maps; fused: x and fc1(x), or x alone.
    assert plain >= x.numel() * 4 + 4 * map_bytes
    assert lean <= x.numel() * 4 + map_bytes + weight_bytes
    assert leaner <= x.numel() * 4 + weight_bytes


def test_tracing_sees_plain_ops():
    mlp = make_mlp(8, torch.float32)

    class FixedSize(torch.nn.Module):

        def __init__(self):
            super().__init__()
            self.mlp = mlp

        def forward(self, x):
            return self.mlp(x, 4, 3)

    x = torch.randn(1, 12, 8, requires_grad=True)
    traced = torch.jit.trace(FixedSize(), (x, ))
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert 'prim::PythonOp' not in kinds
    assert 'aten::gelu' in kinds
    torch.testing.assert_close(traced(x), mlp(x, 4, 3))


def test_double_backward_raises():
    mlp = make_mlp(4)
    x = torch.randn(1, 6, 4, dtype=torch.float64, requires_grad=True)
    out = call(mlp, x, 2, 3)
    grad_out = torch.randn_like(out, requires_grad=True)
    (grad, ) = torch.autograd.grad(out, x, grad_out, create_graph=True)
    with pytest.raises(RuntimeError, match='differentiate twice'):
        grad.sum().backward()


def test_checks():
    mlp = make_mlp(4)
    with pytest.raises(ValueError, match='must be'):
        call(mlp, torch.randn(1, 5, 4, dtype=torch.float64), 2, 3)
    with pytest.raises(ValueError, match='weight shapes'):
        call(mlp, torch.randn(1, 6, 5, dtype=torch.float64), 2, 3)
    with pytest.raises(ValueError, match='impl'):
        Mlp(4, impl='triton')
    with pytest.raises(ValueError, match='impl'):
        Mlp.set_impl(mlp, 'compiled')
    assert "impl='plain'" in repr(Mlp(4, impl='plain'))


def test_set_impl_switches_ttt_layers_and_mlps_together():
    model = HViT3(dict(dims=(32, 64), depths=(1, 1)), out_indices=(0, 1))
    assert set_impl(model, 'plain') == 4
    assert {m.impl for m in model.modules()
            if isinstance(m, (TTT, Mlp))} == {'plain'}
    with pytest.raises(ValueError, match='impl'):
        set_impl(model, 'compiled')


@pytest.mark.parametrize('batch,height,width', [(2, 7, 5), (1, 9, 4),
                                                (3, 1, 6)])
def test_inference_in_bands_equals_whole_map(monkeypatch, batch, height,
                                             width):
    mlp = make_mlp(8)
    x = torch.randn(batch, height * width, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = call(mlp, x, height, width)
        monkeypatch.setattr(bands, 'CPU_BAND_THRESHOLD_BYTES', 0)
        row_bytes = batch * width * 32 * 8
        for rows in range(1, height + 1):
            monkeypatch.setattr(bands, 'CPU_BAND_BYTES', rows * row_bytes)
            assert bands.band_rows(row_bytes, height, 'cpu') == rows
            torch.testing.assert_close(
                call(mlp, x, height, width), expected, rtol=1e-12,
                atol=1e-12)


def test_band_rows():
    # 4 MiB maps whole; 64 MiB in 8 MiB bands; on GPUs always whole
    row_bytes = 256 << 10
    assert bands.band_rows(row_bytes, 16, 'cpu') == 16
    assert bands.band_rows(row_bytes, 256, 'cpu') == 32
    assert bands.band_rows(row_bytes, 256, 'cuda') == 256
    assert bands.band_rows(64 << 20, 2, 'cpu') == 1
