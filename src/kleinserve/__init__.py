"""kleinserve: a self-hosted server for Black Forest Labs' FLUX.2 [klein] image models."""

import os

__version__ = "0.1.0"


# Before torch is imported (it reads this once, at its first allocation): tensors of 2 MiB and more get
# transparent huge pages, so a fresh weight or activation faults in 2 MiB at a time instead of 4 KiB.
# Converting and packing a weight at load is page faults more than work: 3.8 -> 0.85 s per GB of bf16
# weights packed as fp32 (README, Performance).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
