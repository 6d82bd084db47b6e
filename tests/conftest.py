"""Tests run on the CPU (several virtual devices where a test asks for them), also where the TPU
runtime is installed for the ahead-of-time compilation tests; freed host memory is kept for
reuse, as every command line does (`distributed.keep_freed_host_memory`)."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Command lines run by the tests compile afresh (each test stands alone); the compilation
# cache has its own test.
os.environ.setdefault('JAX_ENABLE_COMPILATION_CACHE', 'false')
# LLVM's O1 instead of O2 for the CPU code of every program the tests and their subprocesses
# compile: a third less compile time on the suite's tiny models. XLA's own passes are the same,
# and so are the numbers (a train run's losses and gradient norms agree to the bit). No test
# asserts a speed (the few bounds on time check that injected delays are left out of it).
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                           + ' --xla_backend_optimization_level=1').strip()

from gated_attention import distributed  # pylint: disable=wrong-import-position

distributed.keep_freed_host_memory()
