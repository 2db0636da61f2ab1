"""How ``--grad-accum auto`` splits a batch to fit a memory budget, and the CPU peak probe."""
from __future__ import annotations

import pytest
import torch

from lra_dtn.memory import GIB, choose_grad_accum, step_peak_bytes


def test_choose_grad_accum_takes_the_fewest_micro_batches_that_fit():
    probed = []

    def peak(micro: int) -> int:  # 50 bytes fixed + 100 per example
        probed.append(micro)
        return 50 + 100 * micro

    assert choose_grad_accum(32, peak, 1000) == (4, 850)  # micro 8: 850 <= 1000; micro 16: 1650 > 1000
    assert probed == [32, 16, 8]  # divisors only, stopping at the first fit
    probed.clear()
    assert choose_grad_accum(12, peak, 10**6) == (1, 1250) and probed == [12]  # the whole batch fits: one probe
    probed.clear()
    assert choose_grad_accum(12, peak, 500) == (3, 450) and probed == [12, 6, 4]  # 12 = 3 x 4, not a power of 2


def test_choose_grad_accum_says_when_nothing_fits():
    with pytest.raises(MemoryError, match=r"micro-batch of 1 example needs 1.00 GiB.*budget of 0.50 GiB"):
        choose_grad_accum(4, lambda micro: GIB, GIB // 2)


def test_cpu_probe_sees_a_step_that_allocates_more():
    small = step_peak_bytes(lambda: torch.ones(2**10).sum(), torch.device("cpu"))
    big = step_peak_bytes(lambda: torch.ones(2**26).add_(1).sum(), torch.device("cpu"))  # 256 MiB touched
    assert big >= 200 * 2**20 > small
