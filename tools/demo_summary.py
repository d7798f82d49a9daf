"""One readable picture of what the quick-start models learned.

    python tools/demo_summary.py --det CONFIG CHECKPOINT \\
        --seg CONFIG CHECKPOINT [--data-root data/shapes] [--num-images 6] \\
        [--scale 4] [--out work_dirs/quickstart/summary.png]

For the first val images, one row each: the detector's ground truth and
prediction, then the segmentor's, painted by mmdet's and mmseg's own
visualizers. The 64 x 64 images and their annotations are enlarged
(``--scale``, nearest neighbour) before painting, so that the labels do not
cover the shapes.
"""
import argparse
import os.path as osp
import tempfile
from typing import List

import cv2
import mmcv
import numpy as np
import torch
import torch.nn.functional as F
from mmdet.structures.bbox import BaseBoxes
from mmengine.config import Config
from mmengine.dataset import pseudo_collate
from mmengine.registry import init_default_scope
from mmengine.runner import load_checkpoint
from mmengine.structures import PixelData

import mmvit3  # noqa: F401  (registers HViT3)

HEADER_HEIGHT = 28
TITLES = ('detection: ground truth', 'detection: prediction',
          'segmentation: ground truth', 'segmentation: prediction')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--det', nargs=2, required=True,
                        metavar=('CONFIG', 'CHECKPOINT'))
    parser.add_argument('--seg', nargs=2, required=True,
                        metavar=('CONFIG', 'CHECKPOINT'))
    parser.add_argument(
        '--data-root', default='data/shapes',
        help='the shapes dataset (tools/make_shapes.py): coco/ and ade/')
    parser.add_argument('--num-images', type=int, default=6)
    parser.add_argument('--scale', type=int, default=4,
                        help='enlargement before painting')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='detections: lowest score drawn')
    parser.add_argument('--out', default='work_dirs/quickstart/summary.png')
    return parser.parse_args(argv)


def predict(config: str, checkpoint: str, data_root: str, count: int):
    """(model, visualizer, [data sample with ground truth and prediction])
    for the first ``count`` val images of ``config``, read from
    ``data_root``."""
    cfg = Config.fromfile(config)
    init_default_scope(cfg.default_scope)
    from mmengine.registry import DATASETS, MODELS, VISUALIZERS
    dataset_cfg = cfg.val_dataloader.dataset
    dataset_cfg.data_root = data_root
    dataset = DATASETS.build(dataset_cfg)
    model = MODELS.build(cfg.model)
    load_checkpoint(model, checkpoint, map_location='cpu')
    model.eval()
    with torch.no_grad():
        samples = [
            model.test_step(pseudo_collate([dataset[i]]))[0]
            for i in range(min(count, len(dataset)))
        ]
    visualizer = VISUALIZERS.build(
        dict(cfg.visualizer, name=f'summary-{cfg.default_scope}'))
    visualizer.dataset_meta = dataset.metainfo
    return visualizer, samples


def enlarged_masks(masks: torch.Tensor, scale: int) -> torch.Tensor:
    return F.interpolate(masks[:, None].float(), scale_factor=scale,
                         mode='nearest')[:, 0] > 0.5


def enlarge_instances(instances, scale: int):
    boxes = instances.bboxes
    if isinstance(boxes, BaseBoxes):
        boxes.rescale_((scale, scale))
    else:
        instances.bboxes = boxes * scale
    masks = instances.masks
    if isinstance(masks, torch.Tensor):
        instances.masks = enlarged_masks(masks, scale)
    else:  # BitmapMasks of the ground truth
        instances.masks = enlarged_masks(masks.to_tensor(torch.bool, 'cpu'),
                                         scale)


def enlarged_label_map(pixel_data, scale: int) -> PixelData:
    labels = pixel_data.data
    return PixelData(data=F.interpolate(
        labels[None].float(), scale_factor=scale,
        mode='nearest')[0].to(labels.dtype))


def paint(visualizer, sample, scale: int, score_thr: float,
          work_dir: str) -> np.ndarray:
    """Ground truth and prediction side by side, ``scale`` times larger."""
    image = mmcv.imread(sample.img_path, channel_order='rgb')
    image = mmcv.imrescale(image, scale, interpolation='nearest')
    # the visualizers return their side-by-side picture only as a file
    out_file = osp.join(work_dir, 'panel.png')
    if 'pred_instances' in sample:
        enlarge_instances(sample.gt_instances, scale)
        enlarge_instances(sample.pred_instances, scale)
        visualizer.add_datasample('det', image, sample,
                                  pred_score_thr=score_thr,
                                  out_file=out_file)
    else:
        sample.gt_sem_seg = enlarged_label_map(sample.gt_sem_seg, scale)
        sample.pred_sem_seg = enlarged_label_map(sample.pred_sem_seg, scale)
        visualizer.add_datasample('seg', image, sample, out_file=out_file)
    return mmcv.imread(out_file, channel_order='rgb')


def header(width: int, panels: int) -> np.ndarray:
    strip = np.full((HEADER_HEIGHT, width, 3), 255, np.uint8)
    panel = width // panels
    for i, title in enumerate(TITLES[:panels]):
        cv2.putText(strip, title, (i * panel + 6, HEADER_HEIGHT - 9),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return strip


def summary(rows: List[np.ndarray]) -> np.ndarray:
    grid = np.concatenate(rows, axis=0)
    return np.concatenate([header(grid.shape[1], len(TITLES)), grid], axis=0)


def main(argv=None) -> str:
    args = parse_args(argv)
    det_visualizer, det_samples = predict(
        *args.det, osp.join(args.data_root, 'coco', ''), args.num_images)
    seg_visualizer, seg_samples = predict(
        *args.seg, osp.join(args.data_root, 'ade'), args.num_images)
    with tempfile.TemporaryDirectory() as work_dir:
        rows = [
            np.concatenate([
                paint(det_visualizer, det, args.scale, args.score_thr,
                      work_dir),
                paint(seg_visualizer, seg, args.scale, args.score_thr,
                      work_dir)
            ], axis=1) for det, seg in zip(det_samples, seg_samples)
        ]
    # imwrite takes BGR; the visualizers paint RGB
    mmcv.imwrite(mmcv.rgb2bgr(summary(rows)), args.out)
    print(args.out)
    return args.out


if __name__ == '__main__':
    main()
