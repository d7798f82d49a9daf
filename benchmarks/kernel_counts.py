"""What one backbone training step launches: CUDA kernels and aten
operations, H-ViT3-T (fast path) against Swin-T.

    python benchmarks/kernel_counts.py [--size 800x1216] [--batch 2]
        [--amp {bf16,fp16}] [--device {cpu,cuda}] [--top N]
        [--out-json PATH]

The backbones are built as ``tools/benchmark.py`` builds them (the Mask
R-CNN configs, no pretrained weights), in train mode; a training step is
the forward (under ``torch.autocast`` with ``--amp``) and the backward of
the summed output means, after one warm-up step (Triton compiles there).

- aten operations: every operator call the host dispatches below autograd,
  counted by a ``TorchDispatchMode`` (a custom operator counts once, the
  torch ops it calls inside not at all);
- CUDA kernels: device activities of kind ``kernel`` in a
  ``torch.profiler`` trace of each phase, with memory copies and memsets
  counted apart. On a CPU there are none, and only operations are counted
  (which lets a test run this at a tiny size).

In eager mode every kernel costs the host a launch (several microseconds),
which is what bounds H-ViT3-T's step below 2048x2048 on an H100 (see
BENCHMARKS.md). ``--top N`` also lists each model's N most frequent
operations and, on a GPU, its N kernels of the most device time.
"""
import argparse
import collections
import json
import os.path as osp
import sys
from typing import Callable, Dict, List, Optional

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))),
                            'tools'))
import benchmark  # noqa: E402

MODELS = ('hvit3-t', 'swin-t')
PHASES = ('forward', 'backward')


def parse_args(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--size', default='800x1216', help='HxW')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument(
        '--amp', choices=sorted(benchmark.AMP_DTYPES),
        help='forward under torch.autocast in this dtype (default: float32)')
    parser.add_argument(
        '--device', choices=['cpu', 'cuda'],
        help='default: cuda when a GPU is visible, else cpu')
    parser.add_argument('--top', type=int, default=0, metavar='N',
                        help='also list the N most frequent operations and '
                        'the N kernels of the most device time per model')
    parser.add_argument('--out-json', help='write the counts here as JSON')
    return parser.parse_args(argv)


class OperationCounter(TorchDispatchMode):
    """Counts the operator calls dispatched while it is active, and
    apart the views among them (no kernel: metadata only)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        self.views += func.is_view
        return func(*args, **(kwargs or {}))


def step_phases(model: torch.nn.Module, image: torch.Tensor,
                amp: Optional[str]) -> Dict[str, Callable[[], None]]:
    """The forward and the backward of one training step, as two calls
    (the forward keeps the loss for the backward)."""
    state = {}

    def forward():
        model.zero_grad(set_to_none=True)
        with torch.autocast(image.device.type,
                            dtype=benchmark.AMP_DTYPES.get(amp),
                            enabled=amp is not None):
            state['loss'] = sum(out.mean() for out in model(image))

    def backward():
        state.pop('loss').backward()

    return dict(forward=forward, backward=backward)


def count_operations(phase: Callable[[], None]) -> Dict[str, object]:
    with OperationCounter() as counter:
        phase()
    return dict(operations=counter.counts, views=counter.views)


def count_kernels(phase: Callable[[], None]) -> Dict[str, object]:
    """Kernels, copies and memsets of one phase on the GPU, and the device
    time per kernel name."""
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        phase()
        torch.cuda.synchronize()
    kinds = collections.Counter()
    times = collections.Counter()
    for event in trace.profiler.kineto_results.events():
        kind = event.activity_type()
        if kind == 'kernel':
            times[event.name()] += event.duration_ns() / 1e6
        kinds[kind] += 1
    return dict(kernels=kinds['kernel'],
                copies=kinds['gpu_memcpy'] + kinds['gpu_memset'],
                kernel_ms=dict(times))


def count_step(model: torch.nn.Module, image: torch.Tensor,
               amp: Optional[str]) -> Dict[str, dict]:
    """Per phase: the operations of one step, then (on a GPU) the kernels
    of another."""
    phases = step_phases(model, image, amp)
    for phase in phases.values():  # warm-up: Triton, cuDNN, allocator
        phase()
    counts = {name: count_operations(phase)
              for name, phase in phases.items()}
    if image.is_cuda:
        for name, phase in phases.items():
            counts[name].update(count_kernels(phase))
    return counts


def total(counts: Dict[str, dict], key: str) -> Optional[int]:
    """``key`` summed over both phases; None where it was not counted
    (kernels on a CPU)."""
    values = [counts[phase].get(key) for phase in PHASES]
    return None if None in values else sum(values)


def cell(value) -> str:
    return 'n/a' if value is None else str(value)


def markdown_table(results: Dict[str, Dict[str, dict]]) -> str:
    lines = ['| model | operations fwd | operations bwd | operations | '
             'of them views | kernels fwd | kernels bwd | kernels | '
             'copies + memsets |', '|' + ' --- |' * 9]
    for name, counts in results.items():
        ops = [sum(counts[phase]['operations'].values())
               for phase in PHASES]
        kernels = [counts[phase].get('kernels') for phase in PHASES]
        lines.append(
            f'| {name} | {ops[0]} | {ops[1]} | {sum(ops)} | '
            f"{total(counts, 'views')} | "
            f'{cell(kernels[0])} | {cell(kernels[1])} | '
            f"{cell(total(counts, 'kernels'))} | "
            f"{cell(total(counts, 'copies'))} |")
    return '\n'.join(lines)


def top_lists(results: Dict[str, Dict[str, dict]], top: int) -> str:
    lines = []
    for name, counts in results.items():
        operations = collections.Counter()
        times = collections.Counter()
        for phase in PHASES:
            operations.update(counts[phase]['operations'])
            times.update(counts[phase].get('kernel_ms', {}))
        lines.append(f'\n{name}: most frequent operations (fwd + bwd)\n')
        lines += [f'- {count} x {op}'
                  for op, count in operations.most_common(top)]
        if times:
            lines.append(f'\n{name}: kernels of the most device time\n')
            lines += [f'- {ms:.2f} ms {kernel[:100]}'
                      for kernel, ms in times.most_common(top)]
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None):
    args = parse_args(argv)
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda: no GPU is visible to torch')
    backbones = benchmark.build_backbones(MODELS)
    image = torch.randn(args.batch, 3, *benchmark.parse_size(args.size),
                        device=device)
    results = {}
    for name, model in backbones.items():
        model.to(device)
        model.train()  # mmdet's SwinTransformer.train() returns None
        results[name] = count_step(model, image, args.amp)
    machine = torch.cuda.get_device_name() if device == 'cuda' else 'CPU'
    print(f"training step, batch {args.batch}, {args.size}, "
          f"{args.amp or 'float32'}, {machine}\n")
    print(markdown_table(results))
    if args.top:
        print(top_lists(results, args.top))
    if args.out_json:
        with open(args.out_json, 'w') as out:
            json.dump(dict(argv=argv if argv is not None else sys.argv[1:],
                           device=device, results=results), out, indent=1)
    return results


if __name__ == '__main__':
    main()
