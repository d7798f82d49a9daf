"""Runner-side glue shared by the tools: data-path checks."""
import os.path as osp
from typing import Iterator, List

DOWNLOAD_HINTS = {
    'CocoDataset':
    'COCO 2017 (train2017/, val2017/, annotations/instances_*2017.json, '
    'from cocodataset.org)',
    'ADE20KDataset':
    'ADEChallengeData2016 (images/ and annotations/ with training/ and '
    'validation/, from the MIT Scene Parsing benchmark)',
}


def _dataset_cfgs(dataset) -> Iterator[dict]:
    """The dataset dicts below a (possibly wrapped) dataset config."""
    if not isinstance(dataset, dict):
        return
    if 'data_root' in dataset or 'ann_file' in dataset:
        yield dataset
    yield from _dataset_cfgs(dataset.get('dataset'))
    for inner in dataset.get('datasets') or []:
        yield from _dataset_cfgs(inner)


def _expected_paths(dataset: dict) -> List[str]:
    root = dataset.get('data_root') or ''
    paths = [root] if root else []
    if dataset.get('ann_file'):
        paths.append(osp.join(root, dataset['ann_file']))
    for prefix in (dataset.get('data_prefix') or {}).values():
        if prefix:
            paths.append(osp.join(root, prefix))
    return paths


def check_data_paths(cfg, loader_names: List[str]) -> None:
    """Fail early, saying what to download, when a dataset is not on disk."""
    for loader_name in loader_names:
        loader = cfg.get(loader_name)
        if not loader:
            continue
        for dataset in _dataset_cfgs(loader.get('dataset')):
            paths = _expected_paths(dataset)
            if any('://' in p for p in paths):
                continue  # remote storage: the backend will tell
            missing = [p for p in paths if not osp.exists(p)]
            if not missing:
                continue
            kind = dataset.get('type', 'dataset')
            what = DOWNLOAD_HINTS.get(kind, f'the {kind} data')
            raise FileNotFoundError(
                f'{loader_name}: {kind} data not found, missing '
                f'{missing}. Download {what} to '
                f"{dataset.get('data_root')!r} (the toolbox default), or "
                'point the config at your copy with --cfg-options '
                f'{loader_name}.dataset.data_root=PATH')
