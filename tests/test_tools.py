"""tools/train.py and tools/test.py end to end, as a user runs them."""
import glob
import os.path as osp
import pickle
import re

import pytest
import torch

from mmvit3.testing import det_options, run_tool, seg_options

DET_CONFIG = 'configs/mask_rcnn/mask-rcnn_hvit3-t_fpn_1x_coco.py'
SEG_CONFIG = 'configs/upernet/hvit3-t_upernet_8xb2-160k_ade20k-512x512.py'


def assert_ok(result):
    assert result.returncode == 0, (result.stdout[-3000:] +
                                    result.stderr[-5000:])


@pytest.mark.slow
def test_mask_rcnn_train_then_test(shapes_data, tiny_checkpoint, tmp_path):
    work_dir = str(tmp_path / 'det')
    train = run_tool('tools/train.py', DET_CONFIG, '--work-dir', work_dir,
                     '--cfg-options',
                     *det_options(shapes_data['coco'], tiny_checkpoint,
                                  'val_dataloader'))
    assert_ok(train)
    log = train.stdout + train.stderr
    assert 'Epoch(train) [1][1/1]' in log and 'loss_mask' in log
    assert 'coco/bbox_mAP' in log and 'coco/segm_mAP' in log
    checkpoint = osp.join(work_dir, 'epoch_1.pth')
    assert osp.isfile(checkpoint)

    out = str(tmp_path / 'results.pkl')
    test = run_tool('tools/test.py', DET_CONFIG, checkpoint, '--work-dir',
                    work_dir, '--out', out, '--show-dir', 'painted',
                    '--cfg-options',
                    *det_options(shapes_data['coco'], tiny_checkpoint,
                                 'test_dataloader'))
    assert_ok(test)
    log = test.stdout + test.stderr
    assert 'segm_mAP_copypaste' in log and '(test) [2/2]' in log
    with open(out, 'rb') as f:
        results = pickle.load(f)
    assert len(results) == 2 and 'pred_instances' in results[0]
    assert len(glob.glob(osp.join(work_dir, '*', 'painted', '*.jpg'))) == 2


@pytest.mark.slow
def test_upernet_train_then_test(shapes_data, tiny_checkpoint, tmp_path):
    work_dir = str(tmp_path / 'seg')
    train = run_tool('tools/train.py', SEG_CONFIG, '--work-dir', work_dir,
                     '--cfg-options',
                     *seg_options(shapes_data['ade'], tiny_checkpoint,
                                  'val_dataloader'))
    assert_ok(train)
    log = train.stdout + train.stderr
    assert 'Iter(train) [1/1]' in log and 'decode.loss_ce' in log
    assert 'mIoU' in log and re.search(r'\|\s+circle\s+\|', log)
    checkpoint = osp.join(work_dir, 'iter_1.pth')
    assert osp.isfile(checkpoint)

    out_dir, show_dir = str(tmp_path / 'masks'), str(tmp_path / 'painted')
    test = run_tool('tools/test.py', SEG_CONFIG, checkpoint, '--work-dir',
                    work_dir, '--out', out_dir, '--show-dir', show_dir,
                    '--cfg-options',
                    *seg_options(shapes_data['ade'], tiny_checkpoint,
                                 'test_dataloader'))
    assert_ok(test)
    assert 'mIoU' in test.stdout + test.stderr
    assert len(glob.glob(osp.join(out_dir, '*.png'))) == 2
    assert len(glob.glob(osp.join(show_dir, '**', '*.png'),
                         recursive=True)) == 2


def test_missing_dataset_says_what_to_download(tmp_path):
    result = run_tool('tools/train.py', DET_CONFIG, '--work-dir',
                      str(tmp_path), '--cfg-options',
                      'optim_wrapper.type=OptimWrapper',
                      'train_dataloader.dataset.data_root='
                      f'{tmp_path}/nowhere/')
    assert result.returncode != 0
    assert 'COCO 2017' in result.stderr
    assert 'train_dataloader.dataset.data_root=PATH' in result.stderr


@pytest.mark.skipif(
    torch.cuda.is_available(), reason='AMP is refused only without a GPU')
def test_amp_config_on_cpu_says_how_to_run(tmp_path):
    result = run_tool('tools/train.py', SEG_CONFIG, '--work-dir',
                      str(tmp_path))
    assert result.returncode != 0
    assert 'optim_wrapper.type=OptimWrapper' in result.stderr


def test_missing_pretrained_checkpoint_names_the_option(shapes_data, tmp_path):
    options = seg_options(shapes_data['ade'], str(tmp_path / 'absent.pth'),
                          'val_dataloader')
    result = run_tool('tools/train.py', SEG_CONFIG, '--work-dir',
                      str(tmp_path), '--cfg-options', *options)
    assert result.returncode != 0
    assert 'Pretrained checkpoint not found' in result.stderr
    assert 'model.backbone.init_cfg.checkpoint' in result.stderr
