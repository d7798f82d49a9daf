"""HViT3 under ``torch.compile``: the fast inner step runs eagerly between
the compiled parts and the results match eager mode."""
import torch

from conftest import backbone_outputs_and_grads
from mmvit3.models import HViT3


def small_model() -> HViT3:
    torch.manual_seed(0)
    return HViT3(
        dict(dims=(32, 64), depths=(1, 1)), out_indices=(0, 1),
        drop_path_rate=0.)


def test_compiled_inference_matches_eager_at_two_sizes():
    model = small_model().eval()
    compiled = torch.compile(model)
    with torch.no_grad():
        # the second size recompiles with dynamic shapes
        for size in ((32, 48), (40, 64)):
            image = torch.randn(2, 3, *size)
            for got, expected in zip(compiled(image), model(image)):
                torch.testing.assert_close(got, expected, rtol=1e-4,
                                           atol=1e-5)


def test_compiled_training_step_matches_eager():
    model = small_model()
    image = torch.randn(2, 3, 32, 48)
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
