"""A torch.distributed gloo group of one process, for the integrations' sync=True plumbing (the
multi-rank math of sync is tested in test_distributed.py)."""

from __future__ import annotations

import pytest
import torch.distributed as dist


@pytest.fixture
def gloo_world_of_one():
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if started:
        dist.destroy_process_group()
