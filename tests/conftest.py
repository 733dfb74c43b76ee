import os
import sys

import torch

# tests import the flat modules at the repository root, as a reader would
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, os.cpu_count() or 1))
