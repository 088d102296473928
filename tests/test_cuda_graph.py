"""The decode path on CUDA: what a CUDA graph needs of it (static shapes, no host synchronisation), checked
the way a serving stack would use it: capture one decoding step's MoE block in a graph, replay it on new
inputs and compare with the original. GPU only; no GPU has run it yet (docs/guide/inference.md)."""
import pytest
import torch

import moecompile
from tests.test_small_paths import qwen3_block


@pytest.fixture
def decode_block(cuda_triton):
    block = qwen3_block().cuda().eval()
    fast = moecompile.optimize(block, example_inputs=(torch.randn(2, 8, 32, device="cuda"),))
    spec = moecompile.explain(fast).moe_layers[0].spec
    assert spec.decode_slots >= spec.top_k and not spec.stacked_path  # one token decodes; no host-read form
    return block, fast


@pytest.mark.gpu
def test_decode_step_has_no_host_sync(decode_block):
    """torch.cuda's sync debug mode raises on any device→host synchronisation inside a decode-size call."""
    _, fast = decode_block
    x = torch.randn(1, 1, 32, device="cuda")  # one sequence, one new token: decode_slots = k here
    with torch.no_grad():
        fast(x)
        torch.cuda.set_sync_debug_mode("error")
        try:
            fast(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_decode_step_replays_in_a_cuda_graph(decode_block):
    """Captured once on a static input buffer, replayed on new tokens: the original's outputs each time."""
    block, fast = decode_block
    static_x = torch.randn(1, 1, 32, device="cuda")
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs asks
            for _ in range(3):
                fast(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = fast(static_x)
        for seed in range(3):
            new_x = torch.randn(1, 1, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
            static_x.copy_(new_x)
            graph.replay()
            want = block(new_x)
            got, want = (static_out[0], want[0]) if isinstance(want, tuple) else (static_out, want)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
