"""pytest configuration shared by the whole suite."""

import torch

# The tests use tiny tensors: with several intra-op threads the OpenMP start-up and spinning cost
# more than the work (15x slower per op on a loaded 2-core machine), and one thread also makes
# every CPU reduction order fixed, so repeated runs give bit-identical numbers.
torch.set_num_threads(1)
