import os

import pytest
import torch

# Tests are tiny; one thread keeps them predictable on the shared 2-core machines.
torch.set_num_threads(int(os.environ.get("PDDREG_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
