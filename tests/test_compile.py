"""HViT3 under ``torch.compile``: one graph, whose results match eager
mode."""
import pytest
import torch

from mmvit3.models import HViT3Backbone
from mmvit3.testing import DEVICES, backbone_outputs_and_grads


def small_model() -> HViT3Backbone:
    return HViT3Backbone(
        dict(dims=(32, 64), depths=(1, 1)), out_indices=(0, 1),
        drop_path_rate=0.)


def test_whole_backbone_is_one_graph():
    """The inner step is a custom operator: Dynamo does not break there."""
    explanation = torch._dynamo.explain(small_model())(
        torch.randn(1, 3, 32, 48))
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize('device', DEVICES)
def test_compiled_inference_matches_eager_at_two_sizes(device):
    model = small_model().to(device).eval()
    # dynamic=False: a graph per size (inductor fails on this model's
    # channels-last views with symbolic sizes)
    compiled = torch.compile(model, dynamic=False)
    with torch.no_grad():
        for size in ((32, 48), (40, 64)):
            image = torch.randn(2, 3, *size, device=device)
            for got, expected in zip(compiled(image), model(image)):
                torch.testing.assert_close(got, expected, rtol=1e-4,
                                           atol=1e-5)


@pytest.mark.parametrize('device', DEVICES)
def test_compiled_training_step_matches_eager(device, monkeypatch):
    # cuDNN's TF32 convolutions would round eager and compiled runs apart
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    model = small_model().to(device)
    image = torch.randn(2, 3, 32, 48, device=device)
    expected = backbone_outputs_and_grads(model, image)
    got = backbone_outputs_and_grads(torch.compile(model, dynamic=False),
                                     image)
    # Compiled reductions sum in another order, and some gradients are zero
    # but for rounding (biases before BatchNorm): tolerances relative to the
    # largest value.
    scale = max(t.abs().max() for t in expected)
    for got_tensor, expected_tensor in zip(got, expected):
        torch.testing.assert_close(got_tensor, expected_tensor, rtol=1e-3,
                                   atol=1e-5 * scale)
