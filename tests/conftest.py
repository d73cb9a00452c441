"""Suite-wide settings."""

import os
import tempfile

import torch

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine extra threads slow them badly.
torch.set_num_threads(1)

# The decoder caches measured forward costs under FLUID_CACHE_DIR; tests keep theirs out of the home folder.
os.environ.setdefault("FLUID_CACHE_DIR", tempfile.mkdtemp(prefix="fluid-test-cache-"))
