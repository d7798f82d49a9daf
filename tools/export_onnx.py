"""Export H-ViT3 to ONNX with dynamic height and width, checked by onnxruntime.

    # the backbone (its stage maps), e.g. with the authors' ImageNet weights
    python tools/export_onnx.py --arch tiny \\
        --checkpoint checkpoints/hvit3_tiny.pth --out hvit3-t.onnx
    # the backbone of a trained detector or segmentor
    python tools/export_onnx.py --config CONFIG --checkpoint CKPT \\
        --out backbone.onnx
    # a whole mmseg segmentor: class scores at the input's resolution
    python tools/export_onnx.py --config CONFIG --checkpoint CKPT --whole \\
        --out seg.onnx

The graph's input ``image`` is what the data preprocessor hands the model:
(batch, 3, H, W), RGB, normalised with the config's mean and std. H and W
are free; the batch size is fixed at export (``--batch``) because the
depthwise TTT branch runs one convolution group per image. Some decode
heads fix sizes while tracing (UperNet's pooling pyramid, Semantic FPN's
upsampling); export those with ``--static`` at one H x W (UperNet: H/32
and W/32 multiples of 6, e.g. 384 or 576). After export, onnxruntime is run
and compared with PyTorch (at three sizes, or at the static one); the
command fails if they differ by more than ``--atol`` + ``--rtol`` * |torch|.
"""
import argparse
import importlib
import itertools
import sys
import warnings
from typing import List, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils.model import reparameterize_model
from torch.onnx import symbolic_helper, symbolic_opset9

from mmvit3.models import HViT3Backbone

OPSET = 17
TOOLBOXES = ('mmdet', 'mmseg')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        '--arch', choices=['tiny', 'small', 'base'], help='bare backbone')
    source.add_argument('--config', help='mmdet or mmseg config')
    parser.add_argument(
        '--checkpoint',
        help="with --arch: an authors' ImageNet file (or HViT3 weights); "
        'with --config: a checkpoint of the whole model. Without it the '
        'weights are random.')
    parser.add_argument(
        '--whole',
        action='store_true',
        help='export the whole segmentor (mmseg configs), not the backbone')
    parser.add_argument('--out', required=True, help='output .onnx file')
    parser.add_argument(
        '--shape',
        type=int,
        nargs=2,
        default=(224, 224),
        metavar=('H', 'W'),
        help='about the size to trace and check at (any size runs later); '
        'with --static, the one size the graph takes')
    parser.add_argument(
        '--static',
        action='store_true',
        help='fixed H and W, for decode heads that cannot take any size')
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--atol', type=float, default=1e-4)
    parser.add_argument('--rtol', type=float, default=1e-3)
    return parser.parse_args(argv)


class SegmentorScores(nn.Module):
    """A segmentor's class scores, resized to the input like its predict."""

    def __init__(self, segmentor: nn.Module):
        super().__init__()
        self.segmentor = segmentor

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        scores = self.segmentor(image, mode='tensor')
        return F.interpolate(
            scores,
            size=image.shape[2:],
            mode='bilinear',
            align_corners=self.segmentor.align_corners)


def build_from_arch(arch: str, checkpoint) -> nn.Module:
    backbone = HViT3Backbone(arch, drop_path_rate=0.)
    if checkpoint:
        backbone.load_pretrained(checkpoint)
    return backbone


def build_from_config(config: str, checkpoint, whole: bool) -> nn.Module:
    from mmengine.config import Config
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import init_default_scope
    from mmengine.runner import load_checkpoint

    cfg = Config.fromfile(config)  # imports mmvit3 via custom_imports
    scope = cfg.get('default_scope')
    if scope not in TOOLBOXES:
        raise SystemExit(f'{config}: default_scope {scope!r} is not one of '
                         f'{TOOLBOXES}')
    if whole and scope != 'mmseg':
        raise SystemExit(
            '--whole exports segmentors only: a detector ends in NMS and '
            "RoI ops that need mmdeploy's rewrites; export its backbone")
    init_default_scope(scope)
    model = importlib.import_module(f'{scope}.registry').MODELS.build(
        cfg.model)
    if checkpoint:
        load_checkpoint(model, checkpoint, map_location='cpu', strict=True)
    model = revert_sync_batchnorm(model)
    return SegmentorScores(model) if whole else model.backbone


def pads_at_every_step(size: int, num_downsamples: int) -> bool:
    """Whether the stem and every downsample pad a side of ``size``."""
    if size % 4 == 0:
        return False
    side = -(-size // 4)
    for _ in range(num_downsamples):
        if side % 2 == 0:
            return False
        side = -(-side // 2)
    return True


def trace_size(size: int, num_downsamples: int) -> int:
    """The smallest side >= ``size`` that takes every padding branch.

    The tracer records only the branch its example takes. When every pad
    is taken, the pad amounts are computed from the runtime shape (zero
    where none is needed), so one graph is right for every H and W.
    """
    return next(s for s in itertools.count(size)
                if pads_at_every_step(s, num_downsamples))


@symbolic_helper.parse_args('v', 'v', 'v', 'is', 'is', 'is', 'i', 'is', 'i',
                            'none', 'none', 'none', 'none')
def _convolution(g, input, weight, bias, stride, padding, dilation,
                 transposed, output_padding, groups, *_):
    """Conv whose kernel size is only known at run time.

    The depthwise TTT gradient correlates the keys with an H x W error map:
    a kernel as large as the image. ONNX Conv takes its kernel shape from
    the weight when the attribute is absent; the stock symbolic refuses.
    """
    sizes = symbolic_helper._get_tensor_sizes(weight)
    if transposed or (sizes and None not in sizes[2:]):
        return symbolic_opset9.convolution(g, input, weight, bias, stride,
                                           padding, dilation, transposed,
                                           output_padding, groups)
    inputs = [input, weight]
    if not symbolic_helper._is_none(bias):
        inputs.append(bias)
    return g.op(
        'Conv',
        *inputs,
        strides_i=stride,
        pads_i=padding + padding,
        dilations_i=dilation,
        group_i=groups)


def export(module: nn.Module, out: str, example: torch.Tensor,
           output_names: List[str], dynamic: bool) -> None:
    # Under tracing the TTT layers and MLPs take their plain path (torch
    # ops): the fused autograd functions cannot be exported.
    module.eval()
    dynamic_axes = None
    if dynamic:
        dynamic_axes = {'image': {2: 'height', 3: 'width'}}
        for name in output_names:
            dynamic_axes[name] = {2: f'{name}_height', 3: f'{name}_width'}
    torch.onnx.register_custom_op_symbolic('aten::_convolution',
                                           _convolution, OPSET)
    try:
        with warnings.catch_warnings():
            # expected: the padding branches are fixed by the example size
            warnings.simplefilter('ignore', torch.jit.TracerWarning)
            # chosen: torch.export cannot keep the shape-dependent padding
            # dynamic, and its exporter needs onnxscript
            warnings.filterwarnings('ignore', 'You are using the legacy',
                                    DeprecationWarning)
            # RoPE's strided channel slices; harmless
            warnings.filterwarnings('ignore', 'Constant folding',
                                    UserWarning)
            torch.onnx.export(
                module, (example, ),
                out,
                dynamo=False,
                opset_version=OPSET,
                input_names=['image'],
                output_names=output_names,
                dynamic_axes=dynamic_axes)
    finally:
        torch.onnx.unregister_custom_op_symbolic('aten::_convolution', OPSET)


def compare(module: nn.Module, onnx_path: str,
            shapes: Sequence[Tuple[int, int, int]], atol: float,
            rtol: float) -> List[dict]:
    """onnxruntime against PyTorch on random images of ``shapes``."""
    import onnxruntime
    session = onnxruntime.InferenceSession(
        onnx_path, providers=['CPUExecutionProvider'])
    generator = torch.Generator().manual_seed(0)
    results = []
    for shape in shapes:
        image = torch.randn(*shape[:1], 3, *shape[1:], generator=generator)
        with torch.no_grad():
            expected = module(image)
        if isinstance(expected, torch.Tensor):
            expected = (expected, )
        expected = [e.numpy() for e in expected]
        actual = session.run(None, {'image': image.numpy()})
        same_shapes = all(a.shape == e.shape for a, e in zip(actual, expected))
        results.append(
            dict(
                size=shape[1:],
                max_abs=max(float(np.abs(a - e).max())
                            for a, e in zip(actual, expected))
                if same_shapes else float('inf'),
                close=same_shapes and all(
                    np.allclose(a, e, rtol=rtol, atol=atol)
                    for a, e in zip(actual, expected))))
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.arch:
        module = build_from_arch(args.arch, args.checkpoint)
    else:
        module = build_from_config(args.config, args.checkpoint, args.whole)
    # as deployed: H-ViT3's BatchNorms folded into their convolutions, in
    # the exported graph and in the PyTorch model it is compared with
    module = reparameterize_model(module.eval())
    backbone = next(m for m in module.modules()
                    if isinstance(m, HViT3Backbone))
    if args.static:
        height, width = args.shape
    else:
        num_downsamples = len(backbone.dims) - 1
        height, width = (trace_size(s, num_downsamples) for s in args.shape)
    example = torch.randn(args.batch, 3, height, width)
    output_names = ['scores'] if args.whole else [
        f'stage{i}' for i in backbone.out_indices
    ]
    export(module, args.out, example, output_names, dynamic=not args.static)
    print(f'exported {args.out} (opset {OPSET}, traced at {height}x{width}, '
          f'batch {args.batch}, '
          f"{'static' if args.static else 'dynamic'} H and W)")

    shapes = [(args.batch, height, width)]
    if not args.static:
        # besides the traced size, one that pads nowhere and one in between
        round32 = [-(-s // 32) * 32 for s in args.shape]
        shapes += [(args.batch, *round32),
                   (args.batch, round32[0] + 6, round32[1] - 10)]
    results = compare(module, args.out, shapes, args.atol, args.rtol)
    for result in results:
        print(f"  {result['size'][0]}x{result['size'][1]}: max |onnx - torch| "
              f"= {result['max_abs']:.2e} "
              f"{'ok' if result['close'] else 'MISMATCH'}")
    return 0 if all(result['close'] for result in results) else 1


if __name__ == '__main__':
    sys.exit(main())
