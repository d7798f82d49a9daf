"""Latency and peak memory of H-ViT3-T and Swin-T backbones versus input size.

    python tools/benchmark.py [--devices cpu cuda] [--sizes 512x512 ...]
        [--train-sizes 512x512 ...] [--train-batch 2] [--repeats 5]
        [--threads N] [--compile MODE] [--amp {bf16,fp16}]
        [--out-dir benchmarks]

Three backbones are built in one process, as the detection configs build
them (``configs/mask_rcnn/mask-rcnn_hvit3-t_fpn_1x_coco.py`` and mmdet's
``swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py``, no pretrained weights):
H-ViT3-T on its fast TTT path, the same weights on the plain path of the
spec (the oracle), and mmdet's Swin-T. For each device, mode and size they
run interleaved, round after round (the order reversed every other round),
so that a machine shared with other work slows all of them alike; medians
are reported, with ratios to Swin-T and to the plain path.

- inference: batch 1, ``torch.no_grad()``, eval mode, as deployed (timm's
  ``reparameterize_model``: H-ViT3's BatchNorms folded into their
  convolutions);
- train: a training step, forward + backward of the summed output means, at
  ``--train-batch`` images, train mode (drop path and BatchNorm as trained).

With ``--amp`` every forward runs under ``torch.autocast`` in that dtype (the
published recipes train with AMP); backward runs outside it, as in mmengine's
``AmpOptimWrapper``. Without it, everything is float32.

Time: wall clock on the CPU; CUDA events on a GPU. Peak memory: on a GPU,
``torch.cuda.max_memory_allocated`` above what was allocated before the run;
on a CPU (Linux), the peak resident set size above the one before the run
(``/proc/self/status`` VmHWM after resetting it through
``/proc/self/clear_refs``), in one extra run per point with glibc told to
return every block of 128 KiB or more to the system at once, so that the
peak counts live tensors, not memory freed earlier or heap fragmentation.
The timed runs leave glibc as a long-running process has it: blocks of up
to 32 MiB (where its dynamic mmap threshold stops growing) are reused, and
the heap is not trimmed between runs.

With ``--ttt-layers``, the 17 TTT layers of H-ViT3-T alone (the part the
fast path replaces, qkv and output projections included) are also timed,
fast against plain, each layer on random tokens of its stage's size.

Writes ``results.json`` and ``benchmark.png`` into ``--out-dir`` and prints
the tables as Markdown.
"""
import argparse
import copy
import ctypes
import gc
import json
import math
import os
import os.path as osp
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.utils.model import reparameterize_model

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
HVIT3_CONFIG = osp.join(ROOT, 'configs', 'mask_rcnn',
                        'mask-rcnn_hvit3-t_fpn_1x_coco.py')
SWIN_CONFIG = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'
MODELS = ('hvit3-t', 'hvit3-t-plain', 'swin-t')
DEFAULT_SIZES = ('512x512', '1024x1024', '800x1216', '2048x2048')
AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}
DEFAULT_TRAIN_SIZES = {
    'cpu': ('512x512', '1024x1024'),
    'cuda': DEFAULT_SIZES,
}


def parse_size(text: str) -> Tuple[int, int]:
    height, _, width = text.partition('x')
    return int(height), int(width or height)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument(
        '--devices', nargs='+', choices=['cpu', 'cuda'],
        help='default: cpu, and cuda when a GPU is present')
    parser.add_argument(
        '--sizes', nargs='+', default=list(DEFAULT_SIZES),
        help='inference input sizes, HxW')
    parser.add_argument(
        '--train-sizes', nargs='+',
        help='training-step input sizes, HxW (default: 512x512 1024x1024 on '
        'a CPU, the inference sizes on a GPU)')
    parser.add_argument('--train-batch', type=int, default=2)
    parser.add_argument(
        '--modes', nargs='+', choices=['inference', 'train'],
        default=['inference', 'train'])
    parser.add_argument(
        '--models', nargs='+', choices=MODELS, default=list(MODELS))
    parser.add_argument(
        '--repeats', type=int, default=5, help='timed rounds per point')
    parser.add_argument(
        '--threads', type=int, help='CPU threads (default: torch default)')
    parser.add_argument(
        '--ttt-layers', action='store_true',
        help='also time the TTT layers alone, fast against plain')
    parser.add_argument(
        '--compile', metavar='MODE',
        choices=['default', 'reduce-overhead', 'max-autotune',
                 'max-autotune-no-cudagraphs'],
        help='torch.compile every backbone with this mode, one graph per '
        'size (dynamic=False); the warm-up run compiles')
    parser.add_argument(
        '--amp', choices=sorted(AMP_DTYPES),
        help='forward under torch.autocast in this dtype (default: float32)')
    parser.add_argument('--out-dir', default='benchmarks')
    return parser.parse_args()


def build_backbones(names) -> Dict[str, nn.Module]:
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmengine.config import Config
    from mmengine.hub import get_config
    from mmengine.registry import init_default_scope

    import mmvit3  # noqa: F401  (registers HViT3)
    from mmvit3.models import set_impl
    init_default_scope('mmdet')
    torch.manual_seed(0)
    configs = {
        'hvit3-t': Config.fromfile(HVIT3_CONFIG).model.backbone,
        'swin-t': get_config(SWIN_CONFIG).model.backbone,
    }
    backbones = {}
    for name in ('hvit3-t', 'swin-t'):
        cfg = copy.deepcopy(configs[name])
        cfg.init_cfg = None
        backbones[name] = MMDET_MODELS.build(cfg)
    plain = copy.deepcopy(backbones['hvit3-t'])
    set_impl(plain, 'plain')
    backbones['hvit3-t-plain'] = plain
    return {name: backbones[name] for name in names}


class TTTLayerStack(nn.Module):
    """The TTT layers of H-ViT3-T, each applied to random tokens of its
    stage's map size (standing in for its block's LayerNorm-ed input)."""

    def __init__(self, impl: str):
        super().__init__()
        from mmvit3.models.hvit3 import ARCH_SETTINGS, TTT
        torch.manual_seed(0)
        arch = ARCH_SETTINGS['tiny']
        self.dims = arch['dims']
        self.stages = nn.ModuleList(
            nn.ModuleList(TTT(dim, impl=impl) for _ in range(depth))
            for dim, depth in zip(self.dims, arch['depths']))
        self.tokens = {}

    def _stage_inputs(self, image: torch.Tensor):
        # made in the (untimed) warm-up call of each size and mode
        key = (tuple(image.shape), image.device, torch.is_grad_enabled())
        if key not in self.tokens:
            self.tokens = {}
            batch, _, height, width = image.shape
            height, width = -(-height // 4), -(-width // 4)
            inputs = []
            for stage, dim in enumerate(self.dims):
                if stage:
                    height, width = -(-height // 2), -(-width // 2)
                tokens = torch.randn(
                    batch, height * width, dim, device=image.device,
                    requires_grad=torch.is_grad_enabled())
                inputs.append((tokens, height, width))
            self.tokens[key] = inputs
        return self.tokens[key]

    def forward(self, image: torch.Tensor):
        return [
            layer(tokens, height, width)
            for layers, (tokens, height, width) in zip(
                self.stages, self._stage_inputs(image)) for layer in layers
        ]


class CpuPeakMemory:
    """Peak resident memory of a run, above the resident memory before it."""

    available = sys.platform.startswith('linux')

    def __init__(self):
        if self.available:
            self.libc = ctypes.CDLL('libc.so.6')

    def exact(self, on: bool):
        """On: every freed block of 128 KiB or more leaves the process at
        once (M_MMAP_THRESHOLD), so peaks count live tensors. Off: glibc's
        thresholds as a long-running process reaches them (its dynamic mmap
        threshold stops at 32 MiB, the trim threshold at twice that), so
        freed blocks up to that size are reused without page faults."""
        if self.available:
            mmap_threshold = 128 * 1024 if on else 32 * 2**20
            self.libc.mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD
            self.libc.mallopt(-1, 2 * mmap_threshold)  # M_TRIM_THRESHOLD

    @staticmethod
    def _status_kib(key: str) -> int:
        with open('/proc/self/status') as status:
            for line in status:
                if line.startswith(key):
                    return int(line.split()[1])
        raise KeyError(key)

    def start(self):
        if not self.available:
            return
        gc.collect()
        self.libc.malloc_trim(0)
        with open('/proc/self/clear_refs', 'w') as refs:
            refs.write('5')  # resets VmHWM to the current VmRSS
        self.base = self._status_kib('VmRSS')

    def stop(self) -> float:
        """MiB; NaN where not measurable."""
        if not self.available:
            return float('nan')
        return (self._status_kib('VmHWM') - self.base) / 1024


def timed_run(fn: Callable[[], None], device: str,
              cpu_memory: Optional[CpuPeakMemory] = None
              ) -> Tuple[float, float]:
    """(milliseconds, peak MiB) of one call of ``fn``. On a CPU the peak is
    measured only with ``cpu_memory`` (NaN without): it trims the heap
    first, which would charge the timed run page faults that a
    long-running process does not pay."""
    if device == 'cuda':
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        return start.elapsed_time(end), peak
    if cpu_memory is not None:
        cpu_memory.start()
    begin = time.perf_counter()
    fn()
    elapsed = (time.perf_counter() - begin) * 1000
    peak = cpu_memory.stop() if cpu_memory is not None else float('nan')
    return elapsed, peak


def make_step(model: nn.Module, mode: str, image: torch.Tensor,
              amp: Optional[str] = None):
    """One inference or training step of ``model`` on ``image``; ``amp``:
    a key of ``AMP_DTYPES`` to run the forward under autocast."""

    def autocast():
        return torch.autocast(image.device.type, dtype=AMP_DTYPES.get(amp),
                              enabled=amp is not None)

    if mode == 'inference':
        model.eval()

        def step():
            with torch.no_grad(), autocast():
                model(image)
    else:
        model.train()

        def step():
            model.zero_grad(set_to_none=True)
            with autocast():
                outs = model(image)
            sum(out.mean() for out in outs).backward()
            model.zero_grad(set_to_none=True)
    return step


def make_steps(backbones: Dict[str, nn.Module], device: str, mode: str,
               size: Tuple[int, int], batch: int,
               compile_mode: Optional[str] = None,
               amp: Optional[str] = None) -> Dict[str, Callable]:
    image = torch.randn(batch, 3, *size, device=device)
    steps = {}
    for name, model in backbones.items():
        model = model.to(device)
        if mode == 'inference' and any(
                hasattr(m, 'reparameterize') for m in model.modules()):
            model = reparameterize_model(model.eval())  # a folded copy
        if compile_mode:
            model = torch.compile(model, mode=compile_mode, dynamic=False)
        steps[name] = make_step(model, mode, image, amp)
    return steps


def peak_memory(steps: Dict[str, Callable], device: str,
                cpu_memory: CpuPeakMemory) -> Dict[str, float]:
    """MiB of one run of each step, after a warm-up run. A step that runs
    out of GPU memory is left out (it gets no entry), not the whole run."""
    peaks = {}
    for name, step in steps.items():
        try:
            timed_run(step, device, cpu_memory)
            peaks[name] = timed_run(step, device, cpu_memory)[1]
        except torch.OutOfMemoryError:
            print(f'{name}: out of memory on {device}, left out at this size',
                  flush=True)
    return peaks


def run_times(steps: Dict[str, Callable], device: str,
              repeats: int) -> Dict[str, List[float]]:
    """Milliseconds of interleaved runs, the order reversed every other
    round, after a warm-up run of each step."""
    names = list(steps)
    for name in names:  # warm-up: allocator, kernels, RoPE tables
        timed_run(steps[name], device)
    times = {name: [] for name in names}
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else names[::-1]:
            times[name].append(timed_run(steps[name], device)[0])
    return times


def machine_info(threads: int) -> Dict[str, str]:
    cpu = platform.processor() or platform.machine()
    if osp.exists('/proc/cpuinfo'):
        with open('/proc/cpuinfo') as info:
            names = [
                line.split(':', 1)[1].strip() for line in info
                if line.startswith('model name')
            ]
        if names:
            cpu = names[0]
    info = dict(
        cpu=cpu,
        cpu_count=str(os.cpu_count()),
        torch_threads=str(threads),
        # PASSIVE puts OpenMP's threads to sleep after each parallel op, and
        # waking them costs each op tens of microseconds on a CPU.
        omp_wait_policy=os.environ.get('OMP_WAIT_POLICY', 'default'),
        torch=torch.__version__,
        python=platform.python_version())
    if torch.cuda.is_available():
        info['gpu'] = torch.cuda.get_device_name()
        info['cuda'] = torch.version.cuda or ''
    return info


def milliseconds(value: float) -> str:
    """Tenths where whole milliseconds would hide differences (GPUs)."""
    if math.isnan(value):
        return 'n/a'
    return f'{value:.1f}' if value < 100 else f'{value:.0f}'


def mebibytes(value: float) -> str:
    return 'n/a' if math.isnan(value) else f'{value:.0f}'


def ratio(numerator: float, denominator: float) -> str:
    if denominator and denominator == denominator and numerator == numerator:
        return f'{numerator / denominator:.2f}'
    return 'n/a'


def markdown_tables(results: List[dict], names) -> str:
    lines = []
    for device in dict.fromkeys(r['device'] for r in results):
        for mode in dict.fromkeys(r['mode'] for r in results):
            rows = [r for r in results
                    if r['device'] == device and r['mode'] == mode]
            if not rows:
                continue
            lines.append(f'\n### {device}, {mode} (batch {rows[0]["batch"]})'
                         '\n')
            header = ['size'] + [f'{n} ms' for n in names]
            header += ['H/Swin time', 'H/plain time']
            header += [f'{n} MiB' for n in names]
            header += ['H/Swin mem', 'H/plain mem']
            lines.append('| ' + ' | '.join(header) + ' |')
            lines.append('|' + ' --- |' * len(header))
            for row in rows:
                stats = row['models']

                def get(name, key):
                    return stats[name][key] if name in stats else float(
                        'nan')

                cells = ['x'.join(map(str, row['size']))]
                cells += [milliseconds(get(n, 'ms')) for n in names]
                cells += [
                    ratio(get('hvit3-t', 'ms'), get('swin-t', 'ms')),
                    ratio(get('hvit3-t', 'ms'), get('hvit3-t-plain', 'ms'))
                ]
                cells += [mebibytes(get(n, 'peak_mib')) for n in names]
                cells += [
                    ratio(get('hvit3-t', 'peak_mib'), get('swin-t',
                                                          'peak_mib')),
                    ratio(
                        get('hvit3-t', 'peak_mib'),
                        get('hvit3-t-plain', 'peak_mib'))
                ]
                lines.append('| ' + ' | '.join(cells) + ' |')
            scaling = {tuple(r['size']): r['models'].get('hvit3-t')
                       for r in rows}
            small, large = scaling.get((1024, 1024)), scaling.get((2048, 2048))
            if small and large:
                lines.append(
                    f'\nH-ViT3-T time(2048x2048) / time(1024x1024): '
                    f"{large['ms'] / small['ms']:.2f} (4 pixels for 1)")
    return '\n'.join(lines)


def layer_tables(results: List[dict]) -> str:
    lines = ['\n### TTT layers of H-ViT3-T alone, fast vs plain\n',
             '| device | mode | size | batch | fast ms | plain ms | '
             'plain/fast time | fast MiB | plain MiB | fast/plain mem |',
             '|' + ' --- |' * 10]
    left_out = dict(ms=math.nan, peak_mib=math.nan)  # out of memory
    for row in results:
        fast = row['models'].get('ttt-fast', left_out)
        plain = row['models'].get('ttt-plain', left_out)
        lines.append(
            f"| {row['device']} | {row['mode']} | "
            f"{row['size'][0]}x{row['size'][1]} | {row['batch']} | "
            f"{milliseconds(fast['ms'])} | {milliseconds(plain['ms'])} | "
            f"{ratio(plain['ms'], fast['ms'])} | "
            f"{mebibytes(fast['peak_mib'])} | "
            f"{mebibytes(plain['peak_mib'])} | "
            f"{ratio(fast['peak_mib'], plain['peak_mib'])} |")
    return '\n'.join(lines)


def plot(results: List[dict], names, path: str):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    modes = list(dict.fromkeys(r['mode'] for r in results))
    fig, axes = plt.subplots(
        2, len(modes), figsize=(6 * len(modes), 9), squeeze=False)
    styles = {'cpu': '-', 'cuda': '--'}
    colours = dict(zip(MODELS, ('tab:red', 'tab:orange', 'tab:blue')))
    for column, mode in enumerate(modes):
        for device in dict.fromkeys(r['device'] for r in results):
            rows = sorted((r for r in results
                           if r['mode'] == mode and r['device'] == device),
                          key=lambda r: r['size'][0] * r['size'][1])
            pixels = [r['size'][0] * r['size'][1] / 1e6 for r in rows]
            for name in names:
                label = f'{name} ({device})'
                for row_index, key in enumerate(('ms', 'peak_mib')):
                    values = [r['models'].get(name, {}).get(key, math.nan)
                              for r in rows]
                    axes[row_index][column].plot(
                        pixels, values, styles[device], marker='o',
                        color=colours[name], label=label)
        for row_index, unit in enumerate(('time (ms)', 'peak memory (MiB)')):
            axis = axes[row_index][column]
            axis.set_xscale('log')
            axis.set_yscale('log')
            axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            axis.set_xlabel('megapixels per image')
            axis.set_ylabel(unit)
            axis.set_title(f'{mode}: {unit.split(" (")[0]}')
            axis.grid(True, which='both', alpha=0.3)
            axis.legend(fontsize=8)
    fig.suptitle('H-ViT3-T (fast and plain TTT) vs Swin-T backbones')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or (['cpu', 'cuda']
                               if torch.cuda.is_available() else ['cpu'])
    if 'cuda' in devices and not torch.cuda.is_available():
        raise SystemExit('--devices cuda: no GPU is visible to torch')
    if args.compile:  # a graph per size, mode and model
        torch._dynamo.config.cache_size_limit = 64
    backbones = build_backbones(args.models)
    suites = {'backbone': backbones}
    if args.ttt_layers:
        suites['ttt-layers'] = {
            'ttt-fast': TTTLayerStack('fast'),
            'ttt-plain': TTTLayerStack('plain')
        }
        suites['ttt-layers']['ttt-plain'].load_state_dict(
            suites['ttt-layers']['ttt-fast'].state_dict())
    cpu_memory = CpuPeakMemory()
    info = machine_info(torch.get_num_threads())
    info['compile'] = args.compile or 'eager'
    info['amp'] = args.amp or 'float32'
    print('machine: ' + ', '.join(f'{k} {v}' for k, v in info.items()),
          flush=True)
    points = []
    for device in devices:
        for mode in args.modes:
            if mode == 'inference':
                sizes, batch = args.sizes, 1
            else:
                sizes = args.train_sizes or DEFAULT_TRAIN_SIZES[device]
                batch = args.train_batch
            points += [
                dict(kind=kind, device=device, mode=mode, size=size,
                     batch=batch) for kind in suites
                for size in map(parse_size, sizes)
            ]

    def steps(point, names=None):
        models = {name: model for name, model in suites[point['kind']].items()
                  if names is None or name in names}
        return make_steps(models, point['device'], point['mode'],
                          point['size'], point['batch'], args.compile,
                          args.amp)

    # All peaks first, while no timed run has left freed tensors in the
    # heap; then all times, with the allocator as users have it.
    cpu_memory.exact(True)
    peaks = [peak_memory(steps(p), p['device'], cpu_memory) for p in points]
    cpu_memory.exact(False)
    results = []
    for point, peak in zip(points, peaks):
        # only the models that fit in memory at this point
        times = run_times(steps(point, names=peak.keys()), point['device'],
                          args.repeats)
        stats = {
            name: dict(
                ms=statistics.median(times[name]),
                peak_mib=peak[name],
                ms_runs=times[name])
            for name in times
        }
        results.append(dict(point, models=stats))
        summary = ', '.join(
            f"{name} {milliseconds(s['ms'])} ms "
            f"{mebibytes(s['peak_mib'])} MiB"
            for name, s in stats.items())
        size = point['size']
        print(f"{point['device']} {point['mode']} {size[0]}x{size[1]}: "
              f'{summary}', flush=True)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(osp.join(args.out_dir, 'results.json'), 'w') as out:
        json.dump(dict(machine=info, argv=sys.argv[1:], results=results),
                  out, indent=1)
    backbone_results = [r for r in results if r['kind'] == 'backbone']
    plot(backbone_results, list(backbones),
         osp.join(args.out_dir, 'benchmark.png'))
    print(markdown_tables(backbone_results, list(backbones)))
    layer_results = [r for r in results if r['kind'] == 'ttt-layers']
    if layer_results:
        print(layer_tables(layer_results))


if __name__ == '__main__':
    main()
