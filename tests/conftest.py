"""Tests run on the CPU (several virtual devices where a test asks for them), also where the TPU
runtime is installed for the ahead-of-time compilation tests."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
