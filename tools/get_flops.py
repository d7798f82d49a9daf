"""Params and FLOPs of a detector or segmentor, with mmengine's analysis.

    python tools/get_flops.py CONFIG [--shape H W] [--cfg-options K=V ...]
        [--by-module]

FLOPs are mmengine's (fvcore's) count: one multiply-add is one FLOP; convs,
linear layers, matmuls, norms and upsampling are counted, other elementwise
ops are not. Under tracing the TTT layers and MLPs take their plain path
(torch ops, not the fused autograd functions), so that the inner step's
matmuls and convolutions are counted; the fast path computes the same
products.

As in the published tables (and mmdet 2.x's ``forward_dummy``), a two-stage
detector is counted with 1000 proposals through the box head and the first
100 through the mask head; a segmentor without its auxiliary head, which
inference does not run. Defaults: 1280 x 800 for detectors, 512 x 2048 for
segmentors.
"""
import argparse
from typing import Dict, Sequence, Tuple

import torch
import torch.nn as nn
from mmengine.analysis import FlopAnalyzer, parameter_count
from mmengine.config import Config, DictAction
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import init_default_scope

DEFAULT_SHAPES = {'mmdet': (1280, 800), 'mmseg': (512, 2048)}
NUM_PROPOSALS = 1000


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', help='mmdet or mmseg config file')
    parser.add_argument(
        '--shape',
        type=int,
        nargs='+',
        help='input height and width (one value: square); default 1280 800 '
        'for detectors, 512 2048 for segmentors')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config settings')
    parser.add_argument(
        '--by-module', action='store_true',
        help='also print FLOPs per top-level module')
    return parser.parse_args()


class _Counted(nn.Module):
    """Runs what inference runs, as one traceable ``forward(image)``."""

    def __init__(self, model: nn.Module, scope: str, shape: Tuple[int, int]):
        super().__init__()
        self.model = model
        self.scope = scope
        self.shape = shape

    def forward(self, image: torch.Tensor):
        model = self.model
        if self.scope == 'mmseg':
            return model.decode_head(model.extract_feat(image))
        feats = model.extract_feat(image)
        if getattr(model, 'roi_head', None) is None:
            return model.bbox_head(feats) if hasattr(model,
                                                     'bbox_head') else feats
        return model.rpn_head(feats), model.roi_head.forward(
            feats, [self._proposals(image)])

    def _proposals(self, image: torch.Tensor):
        from mmengine.structures import InstanceData
        height, width = self.shape
        generator = torch.Generator().manual_seed(0)
        corners = torch.rand(NUM_PROPOSALS, 2, 2, generator=generator)
        corners = corners * torch.tensor([width, height], dtype=torch.float)
        boxes = torch.cat([corners.min(1).values, corners.max(1).values], 1)
        return InstanceData(bboxes=boxes.to(image.device))


def build(cfg: Config) -> Tuple[nn.Module, str]:
    """The model of ``cfg`` (no weights loaded) and its toolbox."""
    import mmvit3  # noqa: F401  (registers HViT3)
    scope = cfg.get('default_scope')
    if scope not in DEFAULT_SHAPES:
        raise ValueError(f'default_scope is {scope!r}: get_flops.py counts '
                         f'{tuple(DEFAULT_SHAPES)} configs')
    init_default_scope(scope)
    registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
    model = registry.build(cfg.model)
    if scope == 'mmseg' and getattr(model, 'auxiliary_head', None):
        model.auxiliary_head = None
    return revert_sync_batchnorm(model).eval(), scope


def complexity(cfg: Config, shape: Sequence[int] = None) -> Dict:
    """Params and FLOPs of ``cfg``'s model at input ``shape`` (H, W)."""
    model, scope = build(cfg)
    if not shape:
        shape = DEFAULT_SHAPES[scope]
    height, width = (shape[0], shape[0]) if len(shape) == 1 else shape
    counted = _Counted(model, scope, (height, width))
    image = torch.rand(1, 3, height, width)
    with torch.no_grad():
        analyzer = FlopAnalyzer(counted, (image, ))
        analyzer.unsupported_ops_warnings(False)
        analyzer.uncalled_modules_warnings(False)
        flops_by_module = analyzer.by_module()
    params = parameter_count(model)
    top_level = {
        name: flops_by_module.get(f'model.{name}', 0)
        for name, _ in model.named_children()
    }
    inner = sum(
        flops_by_module.get(f'model.{name}', 0) -
        sum(flops_by_module.get(f'model.{name}.{child}', 0)
            for child in ('qkv', 'proj'))
        for name, module in model.named_modules()
        if type(module).__name__ == 'TTT')
    return dict(
        scope=scope,
        shape=(height, width),
        params=params[''],
        backbone_params=params.get('backbone', 0),
        flops=analyzer.total(),
        flops_by_module=top_level,
        ttt_inner_flops=inner)


def main():
    args = parse_args()
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    result = complexity(cfg, args.shape)
    height, width = result['shape']
    by_module = result['flops_by_module']
    print(f'config: {args.config}')
    print(f'input: 1 x 3 x {height} x {width}')
    print(f"params: {result['params'] / 1e6:.2f} M "
          f"(backbone {result['backbone_params'] / 1e6:.2f} M)")
    print(f"FLOPs: {result['flops'] / 1e9:.1f} G (backbone "
          f"{by_module.get('backbone', 0) / 1e9:.1f} G, of which the TTT "
          f"inner step {result['ttt_inner_flops'] / 1e9:.2f} G)")
    if args.by_module:
        for name, flops in by_module.items():
            print(f'  {name:<20} {flops / 1e9:9.2f} G')


if __name__ == '__main__':
    main()
