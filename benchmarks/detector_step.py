"""Time of one Mask R-CNN training iteration: H-ViT3-T against Swin-T.

    python benchmarks/detector_step.py [--size 1333x800] [--batch 2]
        [--repeats 10] [--warmup 2] [--amp {fp16,bf16} | --no-amp]
        [--device {cpu,cuda}] [--ops {auto,mmcv,torchvision}]
        [--out-json PATH]

Both detectors are built from their configs
(``configs/mask_rcnn/mask-rcnn_hvit3-t_fpn_1x_coco.py`` and mmdet's
``swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py``) without pretrained weights
(the backbones' ``init_cfg=None``, the rest initialised as the runner
would), each with its config's optimizer. An iteration is mmengine's
``train_step`` on a synthetic batch laid out as ``PackDetInputs`` leaves
it: uint8 images of ``--size`` (width x height, as mmdet's scales), a few
random boxes per image with filled-box masks and labels. It includes the
data preprocessor (normalising, padding to 32, moving to the device), the
losses, backward and the optimizer step. AMP is mmengine's
``AmpOptimWrapper`` (autocast and a dynamic loss scale; fp16 by default,
as mmdet's ``--amp``); ``--no-amp`` trains in float32.

Iterations of the two detectors run interleaved, round after round (the
order reversed every other round), after ``--warmup`` iterations each;
medians are reported with the ratio to Swin-T, and on a GPU the peak
memory of an iteration.

``--ops torchvision`` runs mmcv's RoIAlign and NMS through torchvision's
kernels, for an mmcv built with CPU ops only (its CUDA ops take minutes to
build); ``auto`` (the default) does so only where mmcv's NMS fails on the
device. Both detectors use the same ops, so the ratio stays fair.
"""
import argparse
import copy
import importlib
import json
import os.path as osp
import statistics
import sys
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))),
                            'tools'))
import benchmark  # noqa: E402

HVIT3_CONFIG = osp.join(benchmark.ROOT, 'configs', 'mask_rcnn',
                        'mask-rcnn_hvit3-t_fpn_1x_coco.py')
SWIN_CONFIG = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'
DETECTORS = {'hvit3-t': HVIT3_CONFIG, 'swin-t': SWIN_CONFIG}
AMP_DTYPES = {'fp16': 'float16', 'bf16': 'bfloat16'}


def parse_args(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--size', default='1333x800',
                        help='image width x height (mmdet scale order)')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=10,
                        help='timed rounds')
    parser.add_argument('--warmup', type=int, default=2,
                        help='untimed iterations first (at least 1)')
    amp = parser.add_mutually_exclusive_group()
    amp.add_argument('--amp', choices=sorted(AMP_DTYPES), default='fp16',
                     help='AmpOptimWrapper dtype (default: fp16)')
    amp.add_argument('--no-amp', dest='amp', action='store_const',
                     const=None, help='train in float32')
    parser.add_argument(
        '--device', choices=['cpu', 'cuda'],
        help='default: cuda when a GPU is visible, else cpu')
    parser.add_argument(
        '--ops', choices=['auto', 'mmcv', 'torchvision'], default='auto',
        help="RoIAlign and NMS: mmcv's, torchvision's, or torchvision's "
        "where mmcv's lack the device (default)")
    parser.add_argument('--out-json', help='write the results here as JSON')
    return parser.parse_args(argv)


class TorchvisionOps:
    """Stands in for mmcv's compiled extension in ``mmcv.ops.roi_align``
    and ``mmcv.ops.nms`` with torchvision's kernels, for what Mask R-CNN
    calls: average RoIAlign forward and backward, and NMS."""

    @staticmethod
    def roi_align_forward(input, rois, output, argmax_y, argmax_x,
                          aligned_height, aligned_width, spatial_scale,
                          sampling_ratio, pool_mode, aligned):
        from torchvision.ops import roi_align
        if pool_mode != 1:
            raise NotImplementedError('only average RoIAlign is mapped')
        output.copy_(roi_align(input, rois, (aligned_height, aligned_width),
                               spatial_scale, sampling_ratio, aligned))

    @staticmethod
    def roi_align_backward(grad_output, rois, argmax_y, argmax_x,
                           grad_input, aligned_height, aligned_width,
                           spatial_scale, sampling_ratio, pool_mode,
                           aligned):
        grad_input.copy_(torch.ops.torchvision._roi_align_backward(
            grad_output, rois.to(grad_output.dtype), spatial_scale,
            aligned_height, aligned_width, *grad_input.shape,
            sampling_ratio, aligned))

    @staticmethod
    def nms(bboxes, scores, iou_threshold, offset):
        from torchvision.ops import nms
        if offset != 0:
            raise NotImplementedError('only offset 0 is mapped')
        return nms(bboxes, scores, iou_threshold)


def mmcv_nms_runs_on(device: str) -> bool:
    from mmcv.ops import nms
    boxes = torch.tensor([[0., 0., 4., 4.], [1., 1., 5., 5.]], device=device)
    try:
        nms(boxes, torch.tensor([0.9, 0.8], device=device), 0.5)
    except RuntimeError:  # an mmcv built without this device's ops
        return False
    return True


def select_ops(choice: str, device: str) -> str:
    """'mmcv' or 'torchvision', the latter installed into mmcv."""
    if choice == 'auto':
        choice = 'mmcv' if mmcv_nms_runs_on(device) else 'torchvision'
    if choice == 'torchvision':
        # the modules (``mmcv.ops.nms`` as an attribute is the function)
        for module in ('mmcv.ops.nms', 'mmcv.ops.roi_align'):
            importlib.import_module(module).ext_module = TorchvisionOps
    return choice


def build_detector(name: str, device: str, amp: Optional[str]):
    """(model, optim_wrapper) as the runner builds them, no pretrained
    backbone."""
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.hub import get_config
    from mmengine.optim import build_optim_wrapper
    config = DETECTORS[name]
    cfg = get_config(config) if config.startswith('mmdet::') else \
        Config.fromfile(config)
    cfg.model.backbone.init_cfg = None
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    model.to(device)
    wrapper = copy.deepcopy(cfg.optim_wrapper)
    for key in ('type', 'loss_scale', 'dtype'):
        wrapper.pop(key, None)
    if amp:
        wrapper.update(type='AmpOptimWrapper', dtype=AMP_DTYPES[amp],
                       loss_scale='dynamic')
    else:
        wrapper.update(type='OptimWrapper')
    return model, build_optim_wrapper(model, wrapper)


def synthetic_batch(batch: int, width: int, height: int, seed: int = 0,
                    instances: int = 4, classes: int = 80) -> dict:
    """Images, boxes, masks and labels as ``PackDetInputs`` packs them."""
    from mmdet.structures import DetDataSample
    from mmdet.structures.bbox import HorizontalBoxes
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    generator = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for index in range(batch):
        inputs.append(torch.randint(0, 256, (3, height, width),
                                    dtype=torch.uint8, generator=generator))
        corner = torch.rand(instances, 2, generator=generator) * 0.6
        extent = 0.1 + torch.rand(instances, 2, generator=generator) * 0.3
        scale = torch.tensor([width, height], dtype=torch.float32)
        boxes = torch.cat([corner, corner + extent], 1) * scale.repeat(2)
        masks = np.zeros((instances, height, width), dtype=np.uint8)
        for mask, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
            mask[y1:y2, x1:x2] = 1
        sample = DetDataSample(metainfo=dict(
            img_id=index, img_path='', ori_shape=(height, width),
            img_shape=(height, width), scale_factor=(1., 1.), flip=False,
            flip_direction=None))
        sample.gt_instances = InstanceData(
            bboxes=HorizontalBoxes(boxes),
            labels=torch.randint(0, classes, (instances, ),
                                 generator=generator),
            masks=BitmapMasks(masks, height, width))
        sample.ignored_instances = InstanceData(
            bboxes=HorizontalBoxes(torch.zeros(0, 4)),
            labels=torch.zeros(0, dtype=torch.long),
            masks=BitmapMasks(np.zeros((0, height, width), np.uint8), height,
                              width))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def make_iteration(model, optim_wrapper, data: dict) -> Callable[[], None]:
    def iteration():
        model.train_step(data, optim_wrapper)

    return iteration


def run(args) -> Dict[str, dict]:
    from mmengine.logging import MMLogger
    from mmengine.registry import init_default_scope

    import mmvit3  # noqa: F401  (registers HViT3)
    init_default_scope('mmdet')
    # the optimizers' per-parameter settings are not this tool's output
    MMLogger.get_instance('detector_step', log_level='WARNING')
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda: no GPU is visible to torch')
    ops = select_ops(args.ops, device)
    width, height = benchmark.parse_size(args.size)
    data = synthetic_batch(args.batch, width, height)
    iterations = {}
    for name in DETECTORS:
        model, optim_wrapper = build_detector(name, device, args.amp)
        iterations[name] = make_iteration(model, optim_wrapper, data)
    for _ in range(args.warmup - 1):  # run_times warms up once more
        for iteration in iterations.values():
            iteration()
    times = benchmark.run_times(iterations, device, args.repeats)
    peaks = {}
    if device == 'cuda':
        peaks = {name: benchmark.timed_run(iteration, device)[1]
                 for name, iteration in iterations.items()}
    results = {name: dict(ms=statistics.median(runs), ms_runs=runs,
                          peak_mib=peaks.get(name, float('nan')))
               for name, runs in times.items()}
    machine = torch.cuda.get_device_name() if device == 'cuda' else 'CPU'
    print(f'Mask R-CNN training iteration, batch {args.batch}, {args.size} '
          f"(WxH), {'AMP ' + args.amp if args.amp else 'float32'}, "
          f"{machine}, {ops}'s RoIAlign and NMS, medians of "
          f'{args.repeats}\n')
    print('| detector | ms | x Swin-T | peak MiB |\n| --- | --- | --- | --- |')
    for name, result in results.items():
        print(f"| {name} | {benchmark.milliseconds(result['ms'])} | "
              f"{benchmark.ratio(result['ms'], results['swin-t']['ms'])} | "
              f"{benchmark.mebibytes(result['peak_mib'])} |")
    if args.out_json:
        with open(args.out_json, 'w') as out:
            json.dump(dict(args=vars(args), device=machine, ops=ops,
                           results=results), out, indent=1)
    return results


def main(argv: Optional[List[str]] = None) -> Dict[str, dict]:
    return run(parse_args(argv))


if __name__ == '__main__':
    main()
