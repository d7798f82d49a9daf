"""The blocks' conditional position encoding, ``x + dwconv3x3(x) + b`` on
(B, N, C) tokens, by the Triton kernels of :mod:`.mlp.kernels` where they
apply: one kernel forward and two in backward (the token pass and the sum
of its partials), where the convolution path launches the identity tap's
add, the convolution, and the convolution's input, weight and bias
gradients. Elsewhere (CPU, float64, FX and ``torch.jit`` tracing,
TorchScript) the model keeps its convolution."""
import torch

from .mlp import kernels


def uses_kernels(x) -> bool:
    """Whether :func:`triton_cpe` serves tokens ``x``: Triton installed and
    ``x`` a CUDA tensor (not an FX proxy) in float32, bf16 or fp16."""
    return kernels is not None and kernels.applies(x)


def triton_cpe(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               height: int, width: int) -> torch.Tensor:
    """:func:`.mlp.kernels.triton_cpe`."""
    return kernels.triton_cpe(x, weight, bias, height, width)
