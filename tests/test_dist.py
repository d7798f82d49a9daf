"""tools/dist_train.sh: two processes through torch.distributed (gloo on a
CPU) train together: different data on each rank, the same weights."""
import os
import os.path as osp
import socket
import subprocess
import sys

import pytest
import torch

from mmvit3.shapes import make_shapes_dataset
from mmvit3.testing import QUICKSTART_SEG, REPO, quickstart_seg_options

TESTS = osp.dirname(osp.abspath(__file__))
NUM_TRAIN, ITERS = 8, 2  # 2 ranks x 2 iterations x 2 images: one epoch


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_split_the_data_and_agree_on_the_weights(tmp_path):
    roots = make_shapes_dataset(
        str(tmp_path / 'data'), num_train=NUM_TRAIN, num_val=2,
        image_size=(64, 64))
    config = tmp_path / 'probe.py'
    config.write_text(
        f'_base_ = {osp.join(REPO, QUICKSTART_SEG)!r}\n'
        "custom_imports = dict(imports=['mmvit3', 'dist_probe'], "
        'allow_failed_imports=False)\n'
        "custom_hooks = [dict(type='RecordRankHook')]\n")
    work_dir = str(tmp_path / 'run')
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        PORT=str(_free_port()),
        PYTHONPATH=os.pathsep.join([TESTS, os.environ.get('PYTHONPATH', '')]),
        PYTHONWARNINGS='ignore')
    result = subprocess.run(
        ['bash', 'tools/dist_train.sh', str(config), '2', '--work-dir',
         work_dir, '--cfg-options',
         *quickstart_seg_options(roots['ade'], ITERS)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert 'Distributed training: True' in log and 'GPU number: 2' in log
    assert f'Iter(train) [{ITERS}/{ITERS}]' in log and 'mIoU' in log

    ranks = [torch.load(osp.join(work_dir, f'rank{r}.pth')) for r in (0, 1)]
    seen = [set(rank['seen']) for rank in ranks]
    assert all(len(s) == 2 * ITERS for s in seen)
    assert not seen[0] & seen[1], 'both ranks trained on the same images'
    assert len(seen[0] | seen[1]) == NUM_TRAIN

    first, second = ranks[0]['final'], ranks[1]['final']
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert any(not torch.equal(ranks[0]['initial'][n], first[n])
               for n in first), 'training changed no weight'
