"""`python -m rillm.kernels`: build (or find) this machine's CPU kernels ahead of the first run."""

import logging
import sys

from rillm.kernels import default_cache_dir, load_cpu_kernels

logging.basicConfig(level=logging.INFO, format="%(message)s")
if not load_cpu_kernels():
    sys.exit("rillm's CPU kernels could not be built; rillm will run the PyTorch path")
print(f"rillm's CPU kernels are ready in {default_cache_dir()}")
