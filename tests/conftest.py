"""Shared fixtures: a tiny generated dataset in the COCO and ADE20K layouts,
an ImageNet checkpoint in the published layout, and the same random seed
for every test. Helpers live in :mod:`mmvit3.testing`."""
import pytest
import torch

from mmvit3.shapes import make_shapes_dataset
from mmvit3.testing import write_published_checkpoint


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope='session')
def shapes_data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('shapes'))
    return make_shapes_dataset(
        root, num_train=2, num_val=2, image_size=(96, 128), seed=1)


@pytest.fixture(scope='session')
def tiny_checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('pretrained') / 'hvit3_tiny.pth')
    write_published_checkpoint(path, 'tiny')
    return path
