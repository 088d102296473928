import os
import shutil
import subprocess
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


# ---- shared by the command-line and visualization tests --------------------------------------------------
@pytest.fixture(scope="session")
def tiny_captured():
    """The stages of a 2-layer GPT-MoE factory target (test_cli.tiny_gpt_moe), with the export after
    `shortcut` made to fail."""
    import torch

    from moecompile.viz.graph import capture
    from moecompile.viz.targets import load
    export, calls = torch.export.export, []

    def flaky_export(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:  # stage 5: input, find_moe, lift_moe, select_kernels, validate, shortcut
            raise RuntimeError("injected export failure")
        return export(*args, **kwargs)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.export, "export", flaky_export)
        return capture(load("test_cli:tiny_gpt_moe", ["2x8:int64"]))


def debian_tool(command: str, package: str) -> str:
    """The path of `command`, installing Debian's `package` when it is missing (needs root and the network;
    tried once per session); skips the test, saying why, only when that fails."""
    exe = shutil.which(command)
    if exe is None and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update"], capture_output=True, env=env, timeout=600)
        subprocess.run(["apt-get", "install", "-y", package], capture_output=True, env=env, timeout=900)
        exe = shutil.which(command)
    if exe is None:
        pytest.skip(f"no `{command}` on PATH and `apt-get install -y {package}` failed")
    return exe


@pytest.fixture(scope="session")
def chromium():
    return debian_tool("chromium", "chromium")


@pytest.fixture(scope="session")
def graphviz():
    return debian_tool("dot", "graphviz")
