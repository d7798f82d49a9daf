"""The block MLP: the fused function (``mmvit3.ops.mlp.fused``) against the
reference (``mmvit3.ops.mlp.naive``), and the dispatch."""
import pytest
import torch

from mmvit3.models import HViT3Backbone
from mmvit3.models.hvit3 import TTT, Mlp, set_impl
from mmvit3.ops import bands, mlp
from mmvit3.ops.mlp import fused_mlp, naive_mlp
from mmvit3.ops.mlp.fused import FusedMlp
from mmvit3.testing import relative_error, saved_bytes


def make_weights(dim: int, dtype=torch.float64, std: float = 0.5):
    """fc1, dwc and fc2 weights and biases; non-zero biases and a dwc of the
    size of h, so that every term matters."""
    hidden = 4 * dim
    shapes = [(hidden, dim), (hidden, ), (hidden, 1, 3, 3), (hidden, ),
              (dim, hidden), (dim, )]
    return [(torch.randn(shape, dtype=dtype) * std).requires_grad_()
            for shape in shapes]


def outputs_and_grads(fn, x, weights, height, width, grad_out):
    x = x.detach().clone().requires_grad_()
    out = fn(x, *weights, height, width)
    inputs = [x] + [w for w in weights if w.requires_grad]
    return [out] + list(torch.autograd.grad(out, inputs, grad_out))


def assert_agree(got, expected, tolerance):
    for index, (g, e) in enumerate(zip(got, expected)):
        assert g.dtype == e.dtype and g.shape == e.shape, index
        error = relative_error(g, e)
        assert error <= tolerance, f'tensor {index}: relative error {error}'


@pytest.mark.parametrize('batch,dim,height,width',
                         [(2, 8, 5, 7), (1, 4, 1, 1), (3, 4, 1, 6)])
def test_fused_matches_naive_float64(batch, dim, height, width):
    weights = make_weights(dim)
    x = torch.randn(batch, height * width, dim, dtype=torch.float64)
    grad_out = torch.randn_like(x)
    expected = outputs_and_grads(naive_mlp, x, weights, height, width,
                                 grad_out)
    got = outputs_and_grads(fused_mlp, x, weights, height, width, grad_out)
    assert len(got) == 8  # out, x and all six weights
    assert_agree(got, expected, 1e-10)


@pytest.mark.parametrize('trainable', [[4], [3], [0, 2]])
def test_only_some_weights_trainable(trainable):
    weights = [w.detach().requires_grad_(i in trainable)
               for i, w in enumerate(make_weights(8))]
    x = torch.randn(2, 15, 8, dtype=torch.float64)
    grad_out = torch.randn_like(x)

    def run(fn):
        out = fn(x, *weights, 3, 5)  # x itself does not require grad
        return [out] + list(torch.autograd.grad(
            out, [w for w in weights if w.requires_grad], grad_out))

    assert_agree(run(fused_mlp), run(naive_mlp), 1e-10)


def test_gradcheck():
    height, width = 2, 3
    x = torch.randn(1, height * width, 2, dtype=torch.float64,
                    requires_grad=True)

    def fn(x, *weights):
        return fused_mlp(x, *weights, height, width)

    assert torch.autograd.gradcheck(fn, (x, *make_weights(2)))


def test_fused_matches_naive_float32():
    weights = [w.detach().float().requires_grad_()
               for w in make_weights(32, std=0.1)]
    height, width = 12, 10
    x = torch.randn(2, height * width, 32)
    grad_out = torch.randn_like(x)
    assert_agree(
        outputs_and_grads(fused_mlp, x, weights, height, width, grad_out),
        outputs_and_grads(naive_mlp, x, weights, height, width, grad_out),
        1e-5)


def test_bfloat16_autocast_cpu():
    weights = [w.detach().float().requires_grad_()
               for w in make_weights(32, std=0.1)]
    height, width = 8, 6
    x = torch.randn(2, height * width, 32)
    results = []
    for fn in (naive_mlp, fused_mlp):
        x_in = x.clone().requires_grad_()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = fn(x_in, *weights, height, width)
        assert out.dtype == torch.bfloat16
        grads = torch.autograd.grad(out.float().square().sum(),
                                    [x_in] + weights)
        results.append([out.float(), *grads])
    for naive, fused in zip(*results):
        assert torch.isfinite(fused).all()
        assert fused.dtype == naive.dtype
        # bf16 keeps 8 bits: both round each matmul's inputs and output
        assert relative_error(fused, naive) < 3e-2


def test_no_grad_saves_nothing_and_takes_no_graph(monkeypatch):
    weights = [w.detach().float() for w in make_weights(8)]
    x = torch.randn(2, 20, 8)
    expected = naive_mlp(x, *weights, 4, 5)
    calls = []
    apply = FusedMlp.apply
    monkeypatch.setattr(FusedMlp, 'apply',
                        lambda *args: calls.append(1) or apply(*args))
    with torch.no_grad():
        assert saved_bytes(fused_mlp, x, *weights, 4, 5) == 0
        torch.testing.assert_close(fused_mlp(x, *weights, 4, 5), expected)
    # grad mode on, but nothing requires grad: no graph either
    out = fused_mlp(x, *weights, 4, 5)
    assert out.grad_fn is None and not calls
    torch.testing.assert_close(out, expected)


def test_saves_far_less_for_backward():
    weights = [w.detach().float().requires_grad_() for w in make_weights(16)]
    height, width = 16, 16
    x = torch.randn(2, height * width, 16, requires_grad=True)
    map_bytes = x.numel() * 4 * 4
    weight_bytes = sum(w.numel() * 4 for w in weights)
    naive = saved_bytes(naive_mlp, x, *weights, height, width)
    fused = saved_bytes(fused_mlp, x, *weights, height, width)
    # autograd: x and four 4C maps; fused: x and fc1(x)
    assert naive >= x.numel() * 4 + 4 * map_bytes
    assert fused <= x.numel() * 4 + map_bytes + weight_bytes


def test_double_backward_raises():
    x = torch.randn(1, 6, 4, dtype=torch.float64, requires_grad=True)
    out = fused_mlp(x, *make_weights(4), 2, 3)
    grad_out = torch.randn_like(out, requires_grad=True)
    (grad, ) = torch.autograd.grad(out, x, grad_out, create_graph=True)
    with pytest.raises(RuntimeError, match='differentiate twice'):
        grad.sum().backward()


def test_checks():
    weights = make_weights(4)
    with pytest.raises(ValueError, match='must be'):
        fused_mlp(torch.randn(1, 5, 4, dtype=torch.float64), *weights, 2, 3)
    with pytest.raises(ValueError, match='weight shapes'):
        fused_mlp(torch.randn(1, 6, 5, dtype=torch.float64), *weights, 2, 3)
    with pytest.raises(ValueError, match='impl'):
        mlp(torch.randn(1, 6, 4), *weights, 2, 3, impl='triton')
    with pytest.raises(ValueError, match='impl'):
        Mlp(4, impl='triton')
    assert "impl='plain'" in repr(Mlp(4, impl='plain'))


def test_dispatch(monkeypatch):
    """'fast' takes the fused function, 'plain' and tracers the
    reference."""
    weights = [w.detach().float() for w in make_weights(8)]
    x = torch.randn(1, 12, 8, requires_grad=True)
    calls = []
    apply = FusedMlp.apply
    monkeypatch.setattr(FusedMlp, 'apply',
                        lambda *args: calls.append(1) or apply(*args))
    expected = naive_mlp(x, *weights, 4, 3)
    torch.testing.assert_close(mlp(x, *weights, 4, 3), expected)
    assert calls == [1]
    torch.testing.assert_close(mlp(x, *weights, 4, 3, impl='plain'),
                               expected)
    traced = torch.jit.trace(lambda x: mlp(x, *weights, 4, 3), (x, ))
    assert calls == [1]
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert 'prim::PythonOp' not in kinds and 'aten::gelu' in kinds
    torch.testing.assert_close(traced(x), expected)


def test_set_impl_switches_ttt_layers_and_mlps_together():
    model = HViT3Backbone(dict(dims=(32, 64), depths=(1, 1)),
                          out_indices=(0, 1))
    assert set_impl(model, 'plain') == 4
    assert {m.impl for m in model.modules()
            if isinstance(m, (TTT, Mlp))} == {'plain'}
    with pytest.raises(ValueError, match='impl'):
        set_impl(model, 'compiled')


@pytest.mark.parametrize('batch,height,width', [(2, 7, 5), (1, 9, 4),
                                                (3, 1, 6)])
def test_inference_in_bands_equals_whole_map(monkeypatch, batch, height,
                                             width):
    weights = [w.detach() for w in make_weights(8)]
    x = torch.randn(batch, height * width, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = fused_mlp(x, *weights, height, width)
        monkeypatch.setattr(bands, 'CPU_BAND_THRESHOLD_BYTES', 0)
        row_bytes = batch * width * 32 * 8
        for rows in range(1, height + 1):
            monkeypatch.setattr(bands, 'CPU_BAND_BYTES', rows * row_bytes)
            assert bands.band_rows(row_bytes, height, 'cpu') == rows
            torch.testing.assert_close(
                fused_mlp(x, *weights, height, width), expected, rtol=1e-12,
                atol=1e-12)


def test_band_rows_and_switch(monkeypatch):
    # 4 MiB maps whole; 64 MiB in 8 MiB bands; on GPUs always whole
    row_bytes = 256 << 10
    assert bands.band_rows(row_bytes, 16, 'cpu') == 16
    assert bands.band_rows(row_bytes, 256, 'cpu') == 32
    assert bands.band_rows(row_bytes, 256, 'cuda') == 256
    assert bands.band_rows(64 << 20, 2, 'cpu') == 1
    monkeypatch.setattr(bands, 'CPU_INFERENCE_BANDS', False)
    assert bands.band_rows(row_bytes, 256, 'cpu') == 256
