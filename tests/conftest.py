import os

import torch

# Small tensors in tests: one thread avoids oversubscription on the 2-core CI machine.
torch.set_num_threads(1)
os.environ.setdefault("CONTRASTIVE_DEBUG", "0")
