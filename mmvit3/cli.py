"""``tools/train.py`` and ``tools/test.py`` for mmdet AND mmseg configs.

The flags are those of mmdet's and mmseg's own tools; the toolbox is taken
from the config's ``default_scope``. Everything else is mmengine's Runner.
"""
import argparse
import os
import os.path as osp
import re
from typing import List, Optional

import torch
from mmengine.config import Config, ConfigDict, DictAction
from mmengine.runner import Runner

from .fileio import is_url
from .utils import check_data_paths

TOOLBOXES = ('mmdet', 'mmseg')


def _common_args(parser: argparse.ArgumentParser):
    parser.add_argument('config', help='config file path')
    parser.add_argument(
        '--work-dir', help='directory for logs and checkpoints (default: '
        './work_dirs/<config name>)')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings, e.g. '
        'model.backbone.init_cfg.checkpoint=PATH')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    # torch.distributed.launch passes --local-rank (older: --local_rank)
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def load_config(args) -> Config:
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    scope = cfg.get('default_scope')
    if scope not in TOOLBOXES:
        raise ValueError(f'{args.config}: default_scope is {scope!r}; '
                         f'tools/ supports configs of {TOOLBOXES}')
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    if args.launcher != 'none' and not torch.cuda.is_available():
        # the toolboxes' runtimes ask for nccl, which needs GPUs
        cfg.env_cfg.setdefault('dist_cfg', ConfigDict()).backend = 'gloo'
        # mmengine's default DDP wrapping passes device_ids=[LOCAL_RANK],
        # which torch refuses for a CPU model; keep its other defaults
        wrapper = cfg.setdefault(
            'model_wrapper_cfg',
            ConfigDict(
                type='MMDistributedDataParallel',
                broadcast_buffers=False,
                find_unused_parameters=cfg.get('find_unused_parameters',
                                               False)))
        wrapper.device_ids = None
    return cfg


def build_runner(cfg: Config) -> Runner:
    if (cfg.launcher == 'pytorch' and not torch.cuda.is_available()
            and not torch.distributed.is_initialized()):
        # mmengine's init_dist selects a CUDA device first, which fails on a
        # CPU-only machine; it uses a process group that already exists
        torch.distributed.init_process_group(
            backend=cfg.env_cfg.dist_cfg.backend)
    if 'runner_type' in cfg:
        from mmengine.registry import RUNNERS
        return RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)


def parse_train_args(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(
        description='Train an mmdet detector or an mmseg segmentor')
    _common_args(parser)
    parser.add_argument(
        '--amp', action='store_true', help='automatic mixed precision')
    parser.add_argument(
        '--auto-scale-lr',
        action='store_true',
        help='scale the learning rate with the actual total batch size')
    parser.add_argument(
        '--resume',
        nargs='?',
        type=str,
        const='auto',
        help='resume from PATH or an http(s) URL, or (no value) from the '
        'latest checkpoint in the work dir')
    return parser.parse_args(argv)


def latest_checkpoint(work_dir: str) -> Optional[str]:
    """The most recently written ``iter_N.pth`` or ``epoch_N.pth`` in
    ``work_dir`` (the larger N where two share a time).

    mmengine's own ``--resume`` reads the path from ``last_checkpoint``, a
    file it writes after the checkpoint itself: a run killed between the two
    writes would resume from an older checkpoint, or start again. Checkpoints
    are written atomically here, so any that exists is complete. Time, not N,
    decides, so that an earlier run's checkpoints left in the same work dir
    do not win.
    """
    if not osp.isdir(work_dir):
        return None
    candidates = []
    for name in os.listdir(work_dir):
        match = re.fullmatch(r'(?:iter|epoch)_(\d+)\.pth', name)
        if match:
            path = osp.join(work_dir, name)
            candidates.append((os.stat(path).st_mtime_ns,
                               int(match.group(1)), path))
    return max(candidates)[2] if candidates else None


def check_checkpoint(source: str, what: str) -> None:
    """Fail early for a local checkpoint that is not there; a URL is
    downloaded (once, into the cache) when the runner loads it."""
    if not is_url(source) and not osp.isfile(source):
        raise FileNotFoundError(f'{what} {source}: no such file')


def train(argv: Optional[List[str]] = None):
    args = parse_train_args(argv)
    cfg = load_config(args)
    if args.amp:
        if cfg.optim_wrapper.get('type') != 'AmpOptimWrapper':
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.loss_scale = 'dynamic'
    if args.auto_scale_lr:
        if 'base_batch_size' not in cfg.get('auto_scale_lr', {}):
            raise ValueError(
                '--auto-scale-lr needs auto_scale_lr=dict(base_batch_size=N) '
                'in the config (the total batch size its lr is set for)')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        # None: mmengine's own lookup (checkpoints named otherwise)
        cfg.resume, cfg.load_from = True, latest_checkpoint(cfg.work_dir)
    elif args.resume is not None:
        check_checkpoint(args.resume, '--resume')
        cfg.resume, cfg.load_from = True, args.resume
    if (cfg.optim_wrapper.get('type') == 'AmpOptimWrapper'
            and not torch.cuda.is_available()):
        raise ValueError(
            'This config trains with AMP (AmpOptimWrapper), which mmengine '
            'runs on GPUs only. On a CPU add --cfg-options '
            'optim_wrapper.type=OptimWrapper (drop --amp).')
    check_data_paths(cfg, ['train_dataloader', 'val_dataloader'])
    build_runner(cfg).train()


def parse_test_args(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(
        description='Test (and evaluate) an mmdet or mmseg model')
    _common_args(parser)
    parser.add_argument('checkpoint', help='checkpoint file or http(s) URL')
    parser.add_argument(
        '--out',
        help='mmdet: pickle file for the raw results; mmseg: directory for '
        'the predicted masks')
    parser.add_argument(
        '--show', action='store_true', help='show predictions in a window')
    parser.add_argument(
        '--show-dir', help='directory to save painted predictions to')
    parser.add_argument(
        '--wait-time', type=float, default=2, help='seconds per shown image')
    parser.add_argument(
        '--tta', action='store_true', help='test-time augmentation')
    return parser.parse_args(argv)


def _enable_visualization(cfg: Config, args):
    hook = cfg.default_hooks.get('visualization')
    if hook is None:
        raise ValueError('--show/--show-dir need default_hooks.visualization '
                         'in the config')
    hook.draw = True
    if args.show:
        hook.show, hook.wait_time = True, args.wait_time
    if args.show_dir:
        if cfg.default_scope == 'mmdet':
            hook.test_out_dir = args.show_dir
        else:
            cfg.visualizer.save_dir = args.show_dir
            hook.interval = 1  # mmseg's hook otherwise paints every 50th image


def _enable_tta(cfg: Config):
    if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
        raise ValueError('--tta needs tta_model and tta_pipeline in the '
                         'config (mmseg bases define them; for mmdet add them, '
                         "see mmdet's DetTTAModel)")
    cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
    cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline


def test(argv: Optional[List[str]] = None):
    args = parse_test_args(argv)
    cfg = load_config(args)
    check_checkpoint(args.checkpoint, 'checkpoint')
    cfg.load_from = args.checkpoint
    if args.show or args.show_dir:
        _enable_visualization(cfg, args)
    if args.tta:
        _enable_tta(cfg)
    if args.out and cfg.default_scope == 'mmseg':
        cfg.test_evaluator.output_dir = args.out
        cfg.test_evaluator.keep_results = True
    check_data_paths(cfg, ['test_dataloader'])
    runner = build_runner(cfg)
    if args.out and cfg.default_scope == 'mmdet':
        if not args.out.endswith(('.pkl', '.pickle')):
            raise ValueError('--out for mmdet must be a .pkl file')
        from mmdet.evaluation import DumpDetResults
        runner.test_evaluator.metrics.append(
            DumpDetResults(out_file_path=args.out))
    runner.test()
