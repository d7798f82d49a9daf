"""tools/benchmark.py end to end at toy sizes: tables, plot, raw results."""
import argparse
import json
import os
import os.path as osp
import re

import pytest
import torch

from mmvit3.testing import load_tool, run_tool


@pytest.mark.slow
def test_benchmark_writes_ratios_plot_and_results(tmp_path):
    out_dir = tmp_path / 'bench'
    result = run_tool('tools/benchmark.py', '--threads', '1', '--sizes',
                      '64x64', '96x64', '--train-sizes', '128x128',
                      '--repeats', '2', '--ttt-layers', '--out-dir',
                      str(out_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    # one row per size, with both ratios filled in
    rows = re.findall(r'^\| (\d+x\d+) \|(.*)\|$', result.stdout, re.M)
    assert [size for size, _ in rows] == ['64x64', '96x64', '128x128']
    for _, cells in rows:
        assert 'n/a' not in cells and 'nan' not in cells
    assert 'TTT layers of H-ViT3-T alone' in result.stdout
    assert osp.getsize(out_dir / 'benchmark.png') > 10_000

    with open(out_dir / 'results.json') as f:
        saved = json.load(f)
    # CPU timings depend on OpenMP's wait policy, so the results say which
    assert saved['machine']['omp_wait_policy'] == os.environ.get(
        'OMP_WAIT_POLICY', 'default')
    results = saved['results']
    kinds = {(r['kind'], r['mode']) for r in results}
    assert kinds == {('backbone', 'inference'), ('backbone', 'train'),
                     ('ttt-layers', 'inference'), ('ttt-layers', 'train')}
    for row in results:
        for stats in row['models'].values():
            assert len(stats['ms_runs']) == 2 and stats['ms'] > 0
    train = next(r for r in results
                 if r['kind'] == 'backbone' and r['mode'] == 'train')
    # the fast path saves less for backward than the plain one
    assert (train['models']['hvit3-t']['peak_mib'] <
            train['models']['hvit3-t-plain']['peak_mib'])


def test_a_step_out_of_gpu_memory_is_left_out():
    benchmark = load_tool('benchmark')

    def out_of_memory():
        raise torch.OutOfMemoryError('CUDA out of memory')

    steps = {'fits': lambda: None, 'too-large': out_of_memory}
    peaks = benchmark.peak_memory(steps, 'cpu', benchmark.CpuPeakMemory())
    assert list(peaks) == ['fits']
    row = dict(device='cuda', mode='train', size=(64, 64), batch=2,
               models=dict(hvit3=dict(ms=1.0, peak_mib=1.0)))
    table = benchmark.markdown_tables([row], ['hvit3', 'swin-t'])
    assert '| 64x64 | 1.0 | n/a | n/a | n/a | 1 | n/a |' in table


def test_compile_option_compiles_every_backbone(monkeypatch):
    benchmark = load_tool('benchmark')
    compiled = []
    monkeypatch.setattr(
        torch, 'compile',
        lambda model, **options: compiled.append(options) or model)
    backbones = {'a': torch.nn.Conv2d(3, 4, 3), 'b': torch.nn.Conv2d(3, 4, 1)}
    steps = benchmark.make_steps(backbones, 'cpu', 'train', (8, 8), 2,
                                 'reduce-overhead')
    for step in steps.values():
        step()
    assert compiled == [dict(mode='reduce-overhead', dynamic=False)] * 2


class AutocastProbe(torch.nn.Module):
    """Records whether autocast is on in its forward (with the output's
    dtype) and when its output's gradient is computed."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)
        self.seen = []

    def forward(self, image):
        out = self.conv(image)
        self.seen.append(('forward', torch.is_autocast_enabled('cpu'),
                          out.dtype))
        if out.requires_grad:
            out.register_hook(lambda grad: self.seen.append(
                ('backward', torch.is_autocast_enabled('cpu'), grad.dtype)))
        return [out]


@pytest.mark.parametrize('amp, dtype', [(None, torch.float32),
                                        ('bf16', torch.bfloat16),
                                        ('fp16', torch.float16)])
def test_amp_option_autocasts_the_forward_only(amp, dtype):
    benchmark = load_tool('benchmark')
    for mode in ('inference', 'train'):
        probe = AutocastProbe()
        benchmark.make_steps({'probe': probe}, 'cpu', mode, (8, 8), 2,
                             amp=amp)['probe']()
        expected = [('forward', amp is not None, dtype)]
        if mode == 'train':
            expected.append(('backward', False, dtype))
        assert probe.seen == expected


def test_each_stand_in_removes_its_part_and_keeps_the_gradient_path():
    """benchmarks/train_step_parts.py: with a part replaced, that part's
    parameters get no gradient and all others still do."""
    parts_tool = load_tool('train_step_parts', folder='benchmarks')
    backbones = load_tool('benchmark').build_backbones(['hvit3-t', 'swin-t'])
    removed = {
        'hvit3-t': {
            'TTT inner step': ('attn.w1', 'attn.w2', 'attn.w3'),
            'token mixer': ('attn.', ),
            'MLP': ('mlp.', ),
            'stem': ('patch_embed.', ),
            'downsampling': ('downsample.', ),
        },
        'swin-t': {
            'token mixer': ('attn.', ),
            'MLP': ('ffn.', ),
        },
    }
    image = torch.randn(1, 3, 64, 64)
    for name, parts in parts_tool.parts().items():
        model = backbones[name]
        model.train()  # mmdet's SwinTransformer.train() returns None
        assert set(parts) == set(removed[name])
        for part, patches in parts.items():
            model.zero_grad(set_to_none=True)
            parts_tool.patched(
                lambda: sum(out.mean() for out in model(image)).backward(),
                patches)()
            for param_name, param in model.named_parameters():
                gone = any(key in param_name for key in removed[name][part])
                assert (param.grad is None) == gone, (name, part, param_name)


def test_setting_applies_during_the_step_only():
    """benchmarks/train_step_parts.py --setting: a module attribute patched
    for the variant's step, restored after; bad settings are refused."""
    parts_tool = load_tool('train_step_parts', folder='benchmarks')
    chunk_setting = parts_tool.setting(
        'mmvit3.ops.ttt.chunked.CPU_CHUNK_ELEMENTS=100')
    module, name, value = chunk_setting
    assert (module.__name__, name, value) == ('mmvit3.ops.ttt.chunked',
                                              'CPU_CHUNK_ELEMENTS', 100)
    before = module.CPU_CHUNK_ELEMENTS
    seen = []
    parts_tool.patched(lambda: seen.append(module.CPU_CHUNK_ELEMENTS),
                       [chunk_setting])()
    assert seen == [100] and module.CPU_CHUNK_ELEMENTS == before
    for bad in ('CPU_CHUNK_ELEMENTS=1', 'mmvit3.ops.ttt.chunked.NO_SUCH=1',
                'mmvit3.no_such_module.X=1',
                'mmvit3.ops.ttt.chunked.CPU_CHUNK_ELEMENTS=1 <<',
                'mmvit3.ops.ttt.chunked.CPU_CHUNK_ELEMENTS'):
        with pytest.raises(argparse.ArgumentTypeError):
            parts_tool.setting(bad)


def table_rows(text: str):
    """The cells of each row of the Markdown table in ``text``, after its
    header and separator."""
    return [[cell.strip() for cell in line.strip('|').split('|')]
            for line in text.splitlines() if line.startswith('| ')][2:]


@pytest.mark.slow
def test_setting_run_prints_each_variant_against_both_steps():
    result = run_tool('benchmarks/train_step_parts.py', '--threads', '1',
                      '--size', '64x64', '--repeats', '1', '--amp', 'bf16',
                      '--setting',
                      'mmvit3.ops.ttt.chunked.CPU_CHUNK_ELEMENTS=100')
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'training step, batch 2, 64x64, bf16,' in result.stdout
    rows = table_rows(result.stdout)
    assert [row[0] for row in rows] == [
        'as it is', 'mmvit3.ops.ttt.chunked.CPU_CHUNK_ELEMENTS=100', 'Swin-T']
    assert rows[0][2] == '1.000' and float(rows[1][2]) > 0
    assert rows[2][1].isdigit() and rows[2][2:] == ['', '']
    assert 'without' not in result.stdout  # the parts are not timed


def test_kernel_counts_on_a_cpu_count_operations(capsys):
    """benchmarks/kernel_counts.py at a tiny size: both backbones' forward
    and backward operations; no kernels without a GPU."""
    counts_tool = load_tool('kernel_counts', folder='benchmarks')
    # 96x128: the backbone input of the detector_step test below, so that
    # the CPU inner step's compiled chains are reused there
    results = counts_tool.main(['--device', 'cpu', '--size', '96x128',
                                '--top', '3'])
    assert list(results) == ['hvit3-t', 'swin-t']
    for counts in results.values():
        for phase in ('forward', 'backward'):
            operations = sum(counts[phase]['operations'].values())
            assert 0 <= counts[phase]['views'] < operations
            assert 'kernels' not in counts[phase]
    rows = table_rows(capsys.readouterr().out)
    assert [row[0] for row in rows] == ['hvit3-t', 'swin-t']
    for row in rows:
        assert all(cell.isdigit() for cell in row[1:5])
        assert row[5:] == ['n/a'] * 4


@pytest.mark.slow
def test_detector_step_times_both_detectors_on_a_cpu(tmp_path,
                                                     monkeypatch):
    """benchmarks/detector_step.py at a tiny size in float32, with
    torchvision's RoIAlign and NMS in mmcv's place (as on a GPU with
    mmcv's CPU ops only)."""
    import importlib
    step_tool = load_tool('detector_step', folder='benchmarks')
    for name in ('mmcv.ops.nms', 'mmcv.ops.roi_align'):
        module = importlib.import_module(name)  # restored after the test
        monkeypatch.setattr(module, 'ext_module', module.ext_module)
    out = tmp_path / 'detector.json'
    results = step_tool.main(['--size', '128x96', '--no-amp', '--repeats',
                              '1', '--warmup', '1', '--device', 'cpu',
                              '--ops', 'torchvision', '--out-json',
                              str(out)])
    assert list(results) == ['hvit3-t', 'swin-t']
    assert all(result['ms'] > 0 for result in results.values())
    saved = json.loads(out.read_text())
    assert saved['ops'] == 'torchvision' and saved['args']['amp'] is None


def gpu_check_commands(out_dir) -> dict:
    """{step: argv} that tools/gpu_check.sh would run (its dry run)."""
    import shlex
    import subprocess

    from mmvit3.testing import REPO
    result = subprocess.run(
        ['bash', 'tools/gpu_check.sh', str(out_dir)], cwd=REPO,
        env=dict(os.environ, GPU_CHECK_DRY_RUN='1'), capture_output=True,
        text=True, check=True)
    return {step: shlex.split(command) for step, _, command in (
        line.partition(': ') for line in result.stdout.splitlines())}


def test_gpu_check_is_valid_bash_and_its_tools_take_its_flags(
        tmp_path, monkeypatch):
    """Without a GPU: the script parses, and each Python entry point it
    calls accepts the flags it passes."""
    import subprocess
    import sys

    from mmvit3.testing import REPO
    subprocess.run(['bash', '-n', 'tools/gpu_check.sh'], cwd=REPO,
                   check=True)
    commands = gpu_check_commands(tmp_path)
    assert list(commands) == [
        'cuda-tests', 'kernel-counts', 'ttt-kernels', 'bench-eager',
        'detector', 'kernel-counts-amp', 'bench-graphs', 'compile-tests']
    for step, (python, *argv) in commands.items():
        if argv[:2] == ['-m', 'pytest']:
            files = [arg for arg in argv if arg.startswith('tests/')]
            assert files and all(osp.exists(osp.join(REPO, f))
                                 for f in files), step
            continue
        folder, script = osp.split(argv[0])
        tool = load_tool(script[:-3], folder=folder)
        monkeypatch.setattr(sys, 'argv', argv)
        tool.parse_args()  # exits on an unknown flag or a bad value


def test_gpu_check_selects_only_gpu_tests(tmp_path):
    """Its CUDA tests, run here without a GPU, skip every test they select
    as needing one: the selection (by name) holds GPU tests only."""
    _, *argv = gpu_check_commands(tmp_path)['cuda-tests']
    result = run_tool(*argv)
    assert result.returncode == 0, result.stdout[-3000:]
    skipped = re.findall(r'^SKIPPED \[(\d+)\] .*: needs a GPU$',
                         result.stdout, re.M)
    assert ' PASSED' not in result.stdout
    assert sum(map(int, skipped)) >= 30
