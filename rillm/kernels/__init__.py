"""rillm's C++ CPU kernels: compiled once for this machine, cached, loaded as `torch.ops.rillm`.

- `paged_decode_attention` (csrc/paged_attention.cpp): decode attention that reads the paged KV
  cache where it lies instead of gathering it into a padded batch;
- `rotary_cache_write` (csrc/rotary_cache.cpp): the rotary embedding of a step's queries and
  keys and the write of keys and values into the cache, one op instead of ~15, bit-identical
  to the PyTorch path;
- `rms_norm` and `rms_norm_scaled` (csrc/rms_norm.cpp): RMSNorm in one op instead of eight,
  the same roundings but the squares summed in another order (used outside float32 only);
  `rms_norm_scaled` is Gemma's (a float32 1 + w, one rounding; heads sliced from a fused QKV
  output taken as they lie);
- `gguf_linear`, `q8_quantize_blocks` and `gguf_block_bytes` (csrc/gguf_linear.cpp):
  activations rounded to int8 per block of 32 times a GGUF file's own blocks (Q4_0, Q4_1,
  Q5_0, Q8_0, Q4_K, Q5_K, Q6_K; a matrix's parts may mix them) on VNNI, at any number of rows,
  the layout written by gguf_pack.py: the default's matmuls;
- `paged_prefill_attention` (csrc/prefill_attention.cpp): prompt chunks' causal attention read
  from the paged cache, each task a tile of 16 queries against only the keys they see
  (bfloat16, AVX-512 BF16);
- `silu_mul` and `gelu_tanh_mul` (csrc/silu_mul.cpp): SiLU(gate) * up (GeGLU's tanh GELU for
  Gemma) of the fused gate/up projection's output, one pass and one rounding (bfloat16
  models);
- `decode_layer` (csrc/decode_layer.cpp): a whole decoder layer for a decode step on the
  kernels above (its matmuls on gguf_linear), called directly instead of ~30 Python-side calls;
- `argmax_rows` (csrc/argmax.cpp): torch.argmax(dim=-1) of float32 logits, rows on every
  thread (the sampler's greedy pick and Gumbel-max draw);
- `vectorized(name)`: whether a kernel runs its vector path on this build (the CPU feature
  macros of csrc/kernels.h).

Which of them a process runs is decided once, in `plan.py`.

The source is compiled with the machine's C++ compiler against the installed torch's headers
(`-march=native`: the CPU's own vector instructions) into `~/.cache/rillm/kernels/`, named by a
hash of the source, the flags, torch's and Python's versions and the CPU's feature flags, so a
change to any of them builds anew and a home directory shared by different machines never loads
a binary built for another CPU. A build takes ~30 s; `make install` (and `python -m
rillm.kernels`) does it ahead of the first `rillm serve`. Where there is no compiler or the build
fails, `load_cpu_kernels` says why in the log and returns False: the engine then runs the pure
PyTorch path, which gives the same results to rounding.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from rillm.private_cache import UntrustedCache, private_dir, private_file

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
SOURCES = tuple(_CSRC / name for name in ("paged_attention.cpp", "rotary_cache.cpp",
                                          "rms_norm.cpp", "decode_layer.cpp", "argmax.cpp",
                                          "gguf_linear.cpp", "silu_mul.cpp",
                                          "prefill_attention.cpp"))
HEADERS = (_CSRC / "kernels.h",)
CXX_FLAGS = (
    "-O3",
    "-march=native",
    "-std=c++17",
    "-shared",
    "-fPIC",
    # Let the compiler reassociate float sums (vector reductions, fused multiply-adds); each
    # row's arithmetic still does not depend on the rest of the batch. No -ffast-math: the
    # kernel relies on infinities.
    "-fassociative-math",
    "-fno-signed-zeros",
    "-fno-trapping-math",
    "-ffp-contract=fast",
    # at::parallel_for is an OpenMP pragma in ATen's headers: without this flag it compiles to
    # a plain loop on one thread. The library links libgomp.so.1, which resolves to the copy
    # torch already loaded (same soname), so the process keeps one OpenMP thread pool.
    "-fopenmp",
)


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "rillm" / "kernels"


@functools.cache
def load_cpu_kernels(cache_dir: Path | None = None) -> bool:
    """Build the kernels if this machine has no cached build, and load them. True if
    `torch.ops.rillm` now has them; False (logged) where they cannot be built or loaded."""
    try:
        library = _build(cache_dir or default_cache_dir())
        # A process registers the `rillm` op namespace once: loading a second copy aborts it.
        if not _registered():
            torch.ops.load_library(str(library))
    except (OSError, subprocess.CalledProcessError, RuntimeError) as error:
        logger.warning("rillm's C++ CPU kernels are unavailable, using the PyTorch path: %s",
                       error)
        return False
    return True


def kernel_vectorized(name: str) -> bool:
    """The kernel `name` (decode_attention, prefill_attention, gguf_linear, argmax) is loaded
    and was built with its vector path for this CPU. False where the kernels are not loaded."""
    try:
        return bool(torch.ops.rillm.vectorized(name))
    except (AttributeError, RuntimeError):
        return False


def _registered() -> bool:
    try:
        torch.ops.rillm.paged_decode_attention  # noqa: B018 - the lookup is the check
    except (AttributeError, RuntimeError):
        return False
    return True


def _build(cache_dir: Path) -> Path:
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise OSError("no C++ compiler (c++ or g++) on PATH")
    flags = [*CXX_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    library = library_path(cache_dir, f"rillm_kernels_{_build_key(flags)}.so")
    if library.exists():
        return library
    cache_dir = library.parent
    from torch.utils import cpp_extension  # 0.1 s of imports (setuptools): only to build

    includes = [f for path in cpp_extension.include_paths() for f in ("-isystem", path)]
    libraries = [f"-L{path}" for path in cpp_extension.library_paths()]
    # Build beside the target and rename: a concurrent build or a crash never leaves a
    # half-written library under the final name.
    handle, partial = tempfile.mkstemp(suffix=".so", dir=cache_dir)
    os.close(handle)
    logger.info("compiling rillm's C++ CPU kernels into %s (once for this machine)", cache_dir)
    try:
        subprocess.run(
            [compiler, *flags, *includes, *map(str, SOURCES), "-o", partial, *libraries,
             "-lc10", "-ltorch_cpu"],
            check=True, capture_output=True, text=True,
        )
        os.replace(partial, library)
    except subprocess.CalledProcessError as error:
        raise RuntimeError(f"compiling failed: {error.stderr.strip()[-2000:]}") from error
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return library


def library_path(cache_dir: Path, name: str) -> Path:
    """Where the library `name` is, or is to be built: in `cache_dir` where no other user can
    have written it (rillm/private_cache.py), else in a new private directory of this
    process's (logged: the kernels are then built at every start)."""
    try:
        library = private_dir(cache_dir) / name
        if library.exists() or library.is_symlink():
            private_file(library)
        return library
    except UntrustedCache as reason:
        logger.warning("rillm's kernel cache is not used (%s): building into a private "
                       "directory for this process", reason)
        return Path(tempfile.mkdtemp(prefix="rillm-kernels-")) / name


def _build_key(flags: list[str]) -> str:
    digest = hashlib.sha256()
    for source in (*SOURCES, *HEADERS):
        digest.update(source.read_bytes())
    for part in (*flags, torch.__version__, sys.version, platform.machine(), _cpu_features()):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def _cpu_features() -> str:
    """The CPU's feature flags (what -march=native compiled for), where Linux tells them."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return platform.processor()
