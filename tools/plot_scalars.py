"""Plot the training losses and validation metrics of a run.

    python tools/plot_scalars.py WORK_DIR [--out curves.png]

Reads the ``vis_data/scalars.json`` files that mmengine's LocalVisBackend
writes under WORK_DIR (one per run; a resumed run adds one) and draws the
losses against the iteration and every validation metric against the step
it was measured at (the epoch for epoch-based loops, else the iteration).
"""
import argparse
import glob
import json
import os.path as osp
from collections import defaultdict

import matplotlib

matplotlib.use('Agg')  # files only: no display on a CI machine or a server
import matplotlib.pyplot as plt  # noqa: E402

# per-iteration bookkeeping that the runner logs next to the losses
NOT_PLOTTED = {'step', 'iter', 'epoch', 'lr', 'time', 'data_time', 'memory'}


def read_scalars(work_dir):
    """(losses, metrics): name -> [(step, value)], across all runs in order."""
    losses, metrics = defaultdict(list), defaultdict(list)
    # timestamped run folders sort chronologically
    for path in sorted(
            glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json'))):
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                is_train = 'loss' in record
                for name, value in record.items():
                    if name in NOT_PLOTTED or not isinstance(
                            value, (int, float)):
                        continue
                    if not is_train:
                        if value >= 0:  # COCO's -1: no objects of that size
                            metrics[name].append((record['step'], value))
                    elif 'loss' in name:  # not the accuracies logged with them
                        losses[name].append((record['step'], value))
    return losses, metrics


def plot(losses, metrics, out_file, title):
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, points in sorted(losses.items()):
        steps, values = zip(*points)
        loss_ax.plot(steps, values, label=name,
                     linewidth=2.0 if name == 'loss' else 0.8)
    loss_ax.set(xlabel='iteration', ylabel='loss', title='training losses')
    loss_ax.legend(fontsize=7)
    for name, points in sorted(metrics.items()):
        steps, values = zip(*points)
        metric_ax.plot(steps, values, marker='o', label=name)
    metric_ax.set(xlabel='validation step (epoch or iteration)',
                  title='validation metrics')
    if metrics:
        metric_ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_file, dpi=100)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('work_dir')
    parser.add_argument(
        '--out', help='image file (default: WORK_DIR/curves.png)')
    args = parser.parse_args()
    losses, metrics = read_scalars(args.work_dir)
    if not losses:
        raise SystemExit(f'no vis_data/scalars.json with losses under '
                         f'{args.work_dir}: has a training run logged there?')
    out_file = args.out or osp.join(args.work_dir, 'curves.png')
    plot(losses, metrics, out_file, osp.basename(osp.normpath(args.work_dir)))
    print(out_file)


if __name__ == '__main__':
    main()
