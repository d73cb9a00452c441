"""Suite-wide settings."""

import torch

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine extra threads slow them badly.
torch.set_num_threads(1)
