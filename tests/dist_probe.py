"""A hook for test_dist.py, imported by the training processes it starts:
each rank records the images it trained on and its final parameters."""
import os.path as osp

import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


@HOOKS.register_module()
class RecordRankHook(Hook):

    def before_train(self, runner):
        self.seen = []
        self.initial = self._parameters(runner)

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        self.seen += [s.img_path for s in data_batch['data_samples']]

    def after_train(self, runner):
        torch.save(
            dict(
                seen=self.seen,
                initial=self.initial,
                final=self._parameters(runner)),
            osp.join(runner.work_dir, f'rank{get_rank()}.pth'))

    @staticmethod
    def _parameters(runner):
        model = runner.model.module if is_model_wrapper(
            runner.model) else runner.model
        return {
            name: p.detach().clone()
            for name, p in model.named_parameters()
        }
