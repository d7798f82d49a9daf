"""Stopping and resuming training; checkpoints are written atomically."""
import os
import os.path as osp
import signal
import subprocess
import sys
import time

import pytest
import torch
from mmengine.fileio import get_file_backend
from mmengine.runner import save_checkpoint

from mmvit3.checkpoint import load_file
from mmvit3.cli import latest_checkpoint
from mmvit3.fileio import AtomicLocalBackend
from mmvit3.shapes import make_shapes_dataset
from mmvit3.testing import (QUICKSTART_SEG, REPO, quickstart_seg_options,
                            run_tool)

MAX_ITERS = 4


def test_plain_paths_use_the_atomic_backend(tmp_path):
    assert isinstance(get_file_backend(str(tmp_path)), AtomicLocalBackend)


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / 'ckpt' / 'iter_2.pth'
    save_checkpoint({'weights': torch.ones(3)}, str(target))
    before = target.read_bytes()

    def interrupt(fd):
        raise KeyboardInterrupt  # as if stopped mid-write

    monkeypatch.setattr(os, 'fsync', interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({'weights': torch.zeros(1000)}, str(target))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({'weights': torch.zeros(3)}, str(tmp_path / 'new.pth'))
    assert target.read_bytes() == before, 'the old checkpoint was damaged'
    assert sorted(os.listdir(target.parent)) == ['iter_2.pth']
    assert not (tmp_path / 'new.pth').exists()


def test_checkpoints_keep_the_usual_permissions(tmp_path):
    path = tmp_path / 'epoch_1.pth'
    AtomicLocalBackend().put(b'x', str(path))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def _wait_for(path, process, timeout=300):
    deadline = time.time() + timeout
    while not osp.exists(path):
        assert process.poll() is None, 'training ended before its checkpoint'
        assert time.time() < deadline, f'no {path} after {timeout} s'
        time.sleep(0.2)


@pytest.mark.slow
def test_killed_run_resumes_with_its_counters_and_states(tmp_path):
    roots = make_shapes_dataset(
        str(tmp_path / 'data'), num_train=4, num_val=1, image_size=(64, 64))
    work_dir = str(tmp_path / 'run')
    args = [
        'tools/train.py', QUICKSTART_SEG, '--work-dir', work_dir,
        '--cfg-options', *quickstart_seg_options(roots['ade'], MAX_ITERS),
        'default_hooks.checkpoint.interval=1',
        'default_hooks.checkpoint.max_keep_ckpts=10'
    ]
    first = subprocess.Popen([sys.executable, *args], cwd=REPO,
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        _wait_for(osp.join(work_dir, 'iter_1.pth'), first)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    saved = sorted(
        int(n[len('iter_'):-len('.pth')]) for n in os.listdir(work_dir)
        if n.startswith('iter_') and n.endswith('.pth'))
    stopped_at = saved[-1]
    assert stopped_at < MAX_ITERS, 'the run finished before it was killed'
    assert not [n for n in os.listdir(work_dir) if n.endswith('.tmp')]
    # As if killed after writing the checkpoint but before naming it in
    # last_checkpoint (mmengine writes that file second).
    last = osp.join(work_dir, 'last_checkpoint')
    if osp.exists(last):
        os.remove(last)

    second = run_tool(*args[:4], '--resume', *args[4:])
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-5000:]
    assert f'resumed epoch: 0, iter: {stopped_at}' in log
    assert f'Iter(train) [{stopped_at + 1}/{MAX_ITERS}]' in log
    assert f'Iter(train) [{stopped_at}/{MAX_ITERS}]' not in log
    assert 'mIoU' in log

    # mmengine's own objects (the message hub's HistoryBuffer) are not in
    # torch's weights-only allowlist: mmvit3's reader admits them
    final = load_file(osp.join(work_dir, f'iter_{MAX_ITERS}.pth'))
    assert final['meta']['iter'] == MAX_ITERS
    # AdamW counts its steps per parameter: the optimizer state went on from
    # the checkpoint instead of restarting at 0
    steps = {float(s['step']) for s in final['optimizer']['state'].values()}
    assert steps == {float(MAX_ITERS)}
    # and so did the warm-up scheduler's counter
    assert final['param_schedulers'][0]['last_step'] == MAX_ITERS


def test_latest_checkpoint_is_the_last_written(tmp_path):
    assert latest_checkpoint(str(tmp_path / 'missing')) is None
    assert latest_checkpoint(str(tmp_path)) is None
    # written in this order; an earlier run's iter_10 was written first
    for second, name in enumerate(('iter_10.pth', 'iter_1.pth', 'iter_2.pth',
                                   'best_mIoU.pth', 'iter_3.pth.tmp',
                                   'last_checkpoint')):
        path = tmp_path / name
        path.write_bytes(b'')
        os.utime(path, ns=(second * 10**9, second * 10**9))
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / 'iter_2.pth')
    os.utime(tmp_path / 'iter_1.pth', ns=(2 * 10**9, 2 * 10**9))
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / 'iter_2.pth')
