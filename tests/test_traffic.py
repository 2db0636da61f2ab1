"""The traffic model (benchmarks.traffic): bytes counted op by op against ops whose traffic is known."""
from __future__ import annotations

import torch

from benchmarks.traffic import count_traffic, tensor_bytes


def test_layernorm_reads_its_activations_once_forward_and_twice_backward() -> None:
    """LayerNorm's fused kernels: forward reads x and writes y (+ mean, rstd per token); backward reads
    grad_y and x (+ those statistics) and writes grad_x (+ the parameter gradients)."""
    B, T, C = 3, 7, 16
    act, stats, params = B * T * C * 4, B * T * 4, C * 4
    norm = torch.nn.LayerNorm(C)
    x = torch.randn(B, T, C, requires_grad=True)
    grad_y = torch.randn(B, T, C)
    outputs = []
    forward = count_traffic(lambda: outputs.append(norm(x)))
    backward = count_traffic(lambda: outputs[0].backward(grad_y))
    assert (forward.read, forward.written) == (act + 2 * params, act + 2 * stats)
    assert (backward.read, backward.written) == (2 * act + 2 * stats + 2 * params, act + 2 * params)


def test_the_counting_rule() -> None:
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    out = torch.empty(4, 8)
    n = 4 * 8 * 4
    cases = {
        "fresh output": (lambda: a * b, (2 * n, n)),
        "out= is written, not read": (lambda: torch.mul(a, b, out=out), (2 * n, n)),
        "in place reads and writes self": (lambda: out.add_(a), (2 * n, n)),
        "zero_ only writes": (lambda: out.zero_(), (0, n)),
        "views move nothing": (lambda: a[1:].view(-1, 2).t().unsqueeze(0), (0, 0)),
        "a broadcast operand loads once": (lambda: a * b[:1], (n + n // 4, n)),
    }
    for name, (fn, expected) in cases.items():
        traffic = count_traffic(fn)
        assert (traffic.read, traffic.written) == expected, name
    assert tensor_bytes(torch.zeros(5, dtype=torch.float64).expand(3, 5)) == 40
