"""Test-session settings.

The tests run tiny models, for which torch's intra-op threads cost more in synchronisation than they
save (10-50x slower on a loaded 2-core machine); one thread keeps the suite fast and steady."""
import torch

torch.set_num_threads(1)
