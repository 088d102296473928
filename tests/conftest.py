import os
import sys

import pytest

# kernels read TRITON_INTERPRET at import time; set before anything imports them. The `interpreter` tests
# need it; the `gpu` tests need real Triton on CUDA: run those with `TRITON_INTERPRET=0 pytest -m gpu`.
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def cuda_triton():
    """Skips unless real Triton kernels can run on a CUDA device in this process."""
    import torch
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device: torch.cuda.is_available() is False")
    if os.environ["TRITON_INTERPRET"] not in ("", "0"):
        pytest.skip("Triton is in interpreter mode here: run `TRITON_INTERPRET=0 pytest -m gpu`")
