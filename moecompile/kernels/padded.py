"""Expert row blocks padded per expert, for the expert FFN's GEMMs with autograd as bmm (native.py takes
them where Padded.pays)."""
import torch

MIN_EXPERTS, MOST_ROWS, MOST_PADDING = 16, 32, 1.75  # Padded.pays: experts, rows per expert on average, rows


class Padded:
    """The expert row blocks of a call as [E, m, C] (m: the most rows an expert got; each block first, zeros
    after) for one bmm per grouped GEMM in place of _grouped_mm, the operands padded and the results taken
    back per GEMM (the saved tensors keep their [N, C] layouts). Why: on CPU, _grouped_mm is an MKL GEMM per
    expert, each spread over the threads; MKL's batched GEMM (bmm) gives each thread whole experts, which for
    many small experts outweighs the padding's extra rows. Measured (2 threads, in turns with Hugging Face's):
    a Qwen3-MoE-like layer (64 experts of ffn 128, top-8) forward and backward at 256 tokens 1.20-1.34×
    Hugging Face's, against 1.04-1.09× with _grouped_mm; its six GEMMs alone at 128 tokens (1.5× padding)
    16.1 against 19.3 ms. Mixtral-like experts (8 of ffn 1024): a tie (35.3 against 36.1 ms)."""
    def __init__(self, live, counts):
        E, m = counts.shape[0], max(n for _, _, n in live)
        self.shape, self._padded = (E, m), {}
        self.rows = padded_rows(counts, m, live[-1][1] + live[-1][2])                      # [N] row in [E·m]

    @staticmethod
    def pays(live, counts, rows) -> bool:
        """Whether a call's `rows` [N, D] in the expert blocks `live` take the form: fp32 on CPU (measured so
        only), many experts (16 or more; fewer, larger ones tie), two or more threads (one: not measured,
        the grouped GEMMs kept), at most 32 rows per expert on average (above, the GEMMs are large enough),
        and padding to at most 1.75× the rows: a random-init Qwen3-MoE-like model's training step on 2×64
        tokens routes them unevenly (2.75-3.6× padding), and taking the form there lost (0.82-0.90× Hugging
        Face's against 0.98-1.08×)."""
        E = counts.shape[0]
        if (E < MIN_EXPERTS or rows.dtype != torch.float32 or rows.device.type != "cpu"
                or torch.get_num_threads() < 2):
            return False
        N, m = sum(n for _, _, n in live), max((n for _, _, n in live), default=0)
        return 0 < N == rows.shape[0] <= MOST_ROWS * E and E * m <= MOST_PADDING * N

    def pad(self, t):
        """t [N, C] → [E, m, C] (kept for this call: an operand padded once serves every GEMM it enters)."""
        kept = self._padded.get(id(t))
        if kept is None or kept[0] is not t:
            E, m = self.shape
            padded = t.new_zeros(E * m, t.shape[1]).index_copy_(0, self.rows, t)
            kept = self._padded[id(t)] = (t, padded.view(E, m, -1))
        return kept[1]

    def linear(self, rows, W):
        """rows [N, in] @ W[e] per expert block (W [E, in, out]) → [N, out]."""
        return torch.bmm(self.pad(rows), W).view(-1, W.shape[-1]).index_select(0, self.rows)

    def weight_grad(self, grad, rows):
        """Σ over each expert's rows of grad[r]ᵀ rows[r]: [N, out], [N, in] → [E, out, in]."""
        return torch.bmm(self.pad(grad).transpose(1, 2), self.pad(rows))


def padded_rows(counts, m, N):
    """[N]: where each of N rows in expert-major blocks (counts [E] rows each) lands when every block is padded
    to m rows: expert e's r-th row at e·m + r."""
    starts = counts.cumsum(0) - counts                                                        # [E]
    shift = torch.arange(counts.shape[0], device=counts.device) * m - starts                  # [E]
    return torch.arange(N, device=counts.device) + shift.repeat_interleave(counts, output_size=N)
