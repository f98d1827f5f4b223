import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see contrastive/cli.py

import torch  # noqa: E402

# Small tensors in tests: one thread avoids oversubscription on the 2-core CI machine.
torch.set_num_threads(1)
os.environ.setdefault("CONTRASTIVE_DEBUG", "0")
