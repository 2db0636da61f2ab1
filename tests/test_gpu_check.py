"""``benchmarks.gpu``, the GPU check of issue 11, end to end at toy shapes on the CPU (``--tiny``)."""
from __future__ import annotations

import math

from benchmarks import gpu


def test_the_gpu_check_runs_at_toy_shapes_on_cpu(capsys) -> None:
    gpu.main(["--tiny", "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    exact = [line for line in lines if line.strip().startswith(("init ", "far-shifted ", "upward "))]
    # each path's exactness is tested in test_dtn*.py; here: every kernel reported with every gradient
    assert len(exact) == 3 and all(line.split()[1::2][:7] == ["y", "x", "weight", "bias", "gate_mean", "gate_var",
                                                               "pos_proj.weight"] for line in exact)
    steps = [line.split() for line in lines if "|" in line and line.split()[0] in ("listops", "text")]
    assert [row[:2] for row in steps] == [[task, model] for task in ("listops", "text") for model in gpu.MODEL_ROWS]
    for row in steps:  # LN, init, wide ms, then the two time ratios: each ratio is its cells' quotient
        ln, init, wide, r_init, r_wide = map(float, row[2:7])
        for ratio, cell in ((r_init, init), (r_wide, wide)):
            # the cells are rounded to 0.1 ms: at toy shapes (LN ~2 ms) that alone moves the quotient by ~2.5 %
            rounding = 0.05 * (1 + ratio) / ln
            assert math.isclose(ratio, cell / ln, rel_tol=0.005, abs_tol=0.01 + rounding)
    norms = [line for line in lines if "LN" in line and "DTN init" in line]
    assert len(norms) == 2
    header = lines.index(next(line for line in lines if line.split()[:3] == ["steps", "LN", "DTN"]))
    curves = [line.split() for line in lines[header + 1 : header + 5]]
    assert [row[0] for row in curves] == ["1-1", "2-2", "3-3", "4-4"]
    assert all(math.isfinite(float(v)) and float(v) > 0 for row in curves for v in row[1:])
