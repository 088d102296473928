"""Expert row blocks padded per expert, for the expert FFN's GEMMs with autograd as bmm (native.py takes
them where Padded.pays)."""
import torch

# Padded.pays: the fewest experts, the most rows per expert on average, and the padded rows allowed: at most
# MOST_PADDING · N + SPARE_ROWS · E for N rows over E experts
MIN_EXPERTS, MOST_ROWS, MOST_PADDING, SPARE_ROWS = 16, 32, 1.5, 4


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
        rows for at least 3/4 of the experts (the grouped GEMMs skip the others), and E·m padded rows at most
        1.5·N + 4·E for N rows, m the most an expert got: a GEMM of a few rows costs about what one of none
        does, so the fewer rows per expert, the more padding pays. Measured (64 experts of 256 × 128, the
        expert FFN's forward and backward, grouped / padded time) by rows per expert on average: at 1, rows
        for 34-37 experts, 0.79-0.87; at 2, m = 6 1.07-1.27, m = 7 with rows for 45 experts 0.93; at 4,
        m = 8-10 1.15-1.45, 15 0.88; at 8, m = 13 1.05-1.23, 16 1.17, 17 1.09, 22 0.87-0.93; at 16, m = 25
        0.89-1.49, 28 1.03, 35 0.89-0.97, 47 0.79; at 32, m = 43 0.93-1.12, 54-59 0.62-0.79. A random-init
        Qwen3-MoE-like model's training step on 2×64 tokens (m = 44 and 57 at 16) lost with the form (0.82-0.90×
        Hugging Face's against 0.98-1.08×). Against the previous rule (padding ≤ 1.75× N), a Qwen3-MoE-like
        block's forward and backward at 16-64 tokens went from 0.95-1.18× Hugging Face's to 1.09-1.28×."""
        E = counts.shape[0]
        if (E < MIN_EXPERTS or rows.dtype != torch.float32 or rows.device.type != "cpu"
                or torch.get_num_threads() < 2 or 4 * len(live) < 3 * E):
            return False
        N, m = sum(n for _, _, n in live), max((n for _, _, n in live), default=0)
        return 0 < N == rows.shape[0] <= MOST_ROWS * E and E * m <= MOST_PADDING * N + SPARE_ROWS * E

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
