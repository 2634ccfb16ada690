"""Shared setup for the FSDiT tests: one intra-op thread per test.

The models here are tiny, so extra threads buy nothing, and on a shared 2-core machine OpenMP threads that spin
while their partner is descheduled turned a 0.3 s run of 40 optimizer steps into 40 s. Restored after each test.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
