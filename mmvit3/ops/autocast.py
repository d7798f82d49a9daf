"""Autocast for the ops written as ``autograd.Function``s, which autocast
does not see into."""
from typing import List, Optional

import torch


def autocast_inputs(device: str,
                    *tensors: Optional[torch.Tensor]
                    ) -> List[Optional[torch.Tensor]]:
    """``tensors`` cast to the autocast dtype when autocast is on for
    ``device``, as ``nn.Linear`` / ``nn.Conv2d`` would compute them; float64
    tensors (autocast's own rule) and None are left alone."""
    if not torch.is_autocast_enabled(device):
        return list(tensors)
    dtype = torch.get_autocast_dtype(device)
    return [
        t if t is None or t.dtype == torch.float64 else t.to(dtype)
        for t in tensors
    ]
