"""Predict on one image with a trained detector or segmentor; save a picture.

    python tools/demo.py IMAGE CONFIG CHECKPOINT [--out-dir outputs/demo]
        [--score-thr 0.3] [--device cpu]

The toolbox's own inferencer (mmdet's DetInferencer or mmseg's
MMSegInferencer, picked from the config's ``default_scope``) runs the model
and paints the prediction with the toolbox's visualizer.
"""
import argparse
import os.path as osp

from mmengine.config import Config

import mmvit3  # noqa: F401  (registers HViT3; mmengine checkpoints load)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('image')
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('--out-dir', default='outputs/demo')
    parser.add_argument(
        '--score-thr', type=float, default=0.3,
        help='detections: lowest score drawn')
    parser.add_argument('--device', default=None, help='default: cuda if '
                        'available, else cpu')
    args = parser.parse_args()
    for path in (args.image, args.config, args.checkpoint):
        if not osp.isfile(path):
            raise SystemExit(f'{path}: no such file')
    scope = Config.fromfile(args.config).get('default_scope')
    if scope == 'mmdet':
        from mmdet.apis import DetInferencer
        inferencer = DetInferencer(
            args.config, args.checkpoint, device=args.device,
            show_progress=False)
        inferencer(args.image, out_dir=args.out_dir,
                   pred_score_thr=args.score_thr)
    elif scope == 'mmseg':
        from mmseg.apis import MMSegInferencer
        inferencer = MMSegInferencer(args.config, args.checkpoint,
                                     device=args.device)
        inferencer(args.image, out_dir=args.out_dir, show=False)
    else:
        raise SystemExit(f'{args.config}: default_scope {scope!r} is neither '
                         'mmdet nor mmseg')
    print(osp.join(args.out_dir, 'vis', osp.basename(args.image)))


if __name__ == '__main__':
    main()
