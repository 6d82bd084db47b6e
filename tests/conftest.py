"""Tests run on the CPU (several virtual devices where a test asks for them), also where the TPU
runtime is installed for the ahead-of-time compilation tests; freed host memory is kept for
reuse, as every command line does (`distributed.keep_freed_host_memory`)."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Command lines run by the tests compile afresh (each test stands alone); the compilation
# cache has its own test.
os.environ.setdefault('JAX_ENABLE_COMPILATION_CACHE', 'false')

from gated_attention import distributed  # pylint: disable=wrong-import-position

distributed.keep_freed_host_memory()
