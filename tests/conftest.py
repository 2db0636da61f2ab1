"""Test-session settings.

The tests run tiny models, for which torch's intra-op threads cost more in synchronisation than they
save (10-50x slower on a loaded 2-core machine); one thread keeps the suite fast and steady.

The fused DTN path's Triton kernels run on CPU tensors in Triton's interpreter, which is chosen when
triton is imported (``lra_dtn`` imports it when installed): so the variable is set before any import."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
