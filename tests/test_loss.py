"""The output layer's next-token loss, whole and a chunk of positions at a time, against NumPy."""

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gated_attention import config as config_lib
from gated_attention import loss as loss_lib
from gated_attention.train import compiled_memory
from tests import helpers

PAD = 3


def _inputs(batch=2, length=8, d_model=6, vocab=11, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, length, d_model)).astype(np.float32)
  kernel = rng.normal(size=(d_model, vocab)).astype(np.float32)
  targets = rng.integers(0, vocab, size=(batch, length)).astype(np.int32)
  targets[0, :3] = PAD
  return x, kernel, targets


def _reference(x, kernel, targets, pad_id):
  """Summed cross-entropy, count, and its gradients for x and kernel, from the formula in
  float64: loss = logsumexp(z) - z[target] with z = x W; dL/dz = softmax(z) - one_hot."""
  x, kernel = x.astype(np.float64), kernel.astype(np.float64)
  z = x @ kernel
  z_max = z.max(-1, keepdims=True)
  lse = np.log(np.exp(z - z_max).sum(-1)) + z_max[..., 0]
  mask = np.ones(targets.shape, bool) if pad_id is None else targets != pad_id
  losses = lse - np.take_along_axis(z, targets[..., None], -1)[..., 0]
  grad_z = np.exp(z - lse[..., None]) - np.eye(kernel.shape[1])[targets]
  grad_z *= mask[..., None]
  return (np.sum(losses * mask), mask.sum(), grad_z @ kernel.T,
          np.einsum('btd,btv->dv', x, grad_z))


@pytest.mark.parametrize('chunk', [0, 8, 2])
@pytest.mark.parametrize('pad_id', [None, PAD])
def test_loss_and_gradients_match_the_formula(chunk, pad_id):
  x, kernel, targets = _inputs()
  loss_sum, num_tokens, grad_x, grad_kernel = _reference(x, kernel, targets, pad_id)
  got = jax.jit(lambda x, k: loss_lib.next_token_loss(x, k, targets, pad_id, chunk))(x, kernel)
  np.testing.assert_allclose(got[0], loss_sum, rtol=1e-5)
  assert int(got[1]) == num_tokens
  # d(3 * loss_sum): the backward pass scales by the incoming cotangent.
  grads = jax.grad(lambda x, k: 3 * loss_lib.next_token_loss(x, k, targets, pad_id, chunk)[0],
                   argnums=(0, 1))(jnp.asarray(x), jnp.asarray(kernel))
  np.testing.assert_allclose(grads[0], 3 * grad_x, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(grads[1], 3 * grad_kernel, rtol=1e-4, atol=1e-5)


def test_bfloat16_inputs_give_bfloat16_gradients_close_to_float32():
  x, kernel, targets = _inputs(d_model=16, vocab=64)
  loss = lambda x, k: loss_lib.next_token_loss(x, k, targets, PAD, 4)[0]
  exact = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(kernel))
  low = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x, jnp.bfloat16),
                                       jnp.asarray(kernel, jnp.bfloat16))
  for got, want in zip(low, exact):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0.05, atol=0.05)


def test_a_chunk_that_does_not_divide_the_length_is_named():
  x, kernel, targets = _inputs()
  with pytest.raises(ValueError, match='model.loss_chunk=3 must divide the sequence length 8'):
    loss_lib.next_token_loss(x, kernel, targets, None, 3)
  config = config_lib.base_config()
  config.data.seq_len, config.model.loss_chunk = 64, 24
  with pytest.raises(config_lib.ConfigError, match='model.loss_chunk=24 must be 0 .* divide '
                     'data.seq_len=64'):
    config_lib.validate(config)


def test_chunks_keep_only_one_chunk_of_logits_alive():
  """Compiled memory of the loss's gradient: whole [4, 512, 4096] float32 logits (32 MiB, and
  their gradient) against 32-position chunks (2 MiB each)."""
  x, kernel, targets = _inputs(batch=4, length=512, d_model=32, vocab=4096)
  def temporaries(chunk):
    grad = jax.jit(jax.grad(lambda x, k: loss_lib.next_token_loss(x, k, targets, None, chunk)[0],
                            argnums=(0, 1)))
    return compiled_memory(grad.lower(x, kernel).compile())['temporaries']
  whole, chunked = temporaries(0), temporaries(32)
  assert whole > 32 * 2**20 > 4 * chunked, (whole, chunked)


_ON_A_MESH = textwrap.dedent('''
    import json, re, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding
    from gated_attention import loss as loss_lib, sharding
    from tests.test_loss import PAD, _inputs, _reference
    x, kernel, targets = _inputs(batch=8, length=16, d_model=8, vocab=24)
    want = _reference(x, kernel, targets, PAD)
    report = {}
    for mesh_shape in json.loads(sys.argv[1]):
      mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape)))
      place = lambda a, axes: jax.device_put(a, NamedSharding(
          mesh, sharding.logical_to_spec(axes, a.shape, mesh)))
      args = (place(x, ('batch', 'length', 'embed')), place(kernel, loss_lib.KERNEL_AXES),
              place(targets, ('batch', 'length')))
      loss = lambda x, k, t: loss_lib.next_token_loss(x, k, t, PAD, 4)[0]
      step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
      with jax.set_mesh(mesh):
        (total, (grad_x, grad_kernel)) = step(*args)
        text = step.lower(*args).compile().as_text()
      bodies = set(re.findall(r'body=%?([\\w.\\-]+)', text))
      in_loops, body = [], None
      for line in text.splitlines():
        header = re.match(r'^%?([\\w.\\-]+) ', line)
        if header and line.endswith('{'):
          body = header.group(1)
        found = re.search(r'= (.*?) (all-reduce|reduce-scatter|all-gather|all-to-all|'
                          r'collective-permute)(-start)?\\(', line)
        if found and body in bodies:
          in_loops += re.findall(r'\\w+\\[[\\d,]*\\]', found.group(1))
      error = lambda got, ref: float(np.max(np.abs(np.asarray(got) - ref)) / np.max(np.abs(ref)))
      report[str(mesh_shape)] = {'loss': error(total, want[0]), 'grad_x': error(grad_x, want[2]),
                                 'grad_kernel': error(grad_kernel, want[3]),
                                 'collectives_in_loops': in_loops, 'loop_bodies': len(bodies)}
    print(json.dumps(report))
''')


def test_on_a_mesh_each_device_takes_its_rows_and_vocabulary_slice_and_reduces_once():
  """Loss and gradients against the formula on 8 CPU devices, the kernel's rows over fsdp and
  its vocabulary over tensor; inside the chunk loop nothing is gathered or reduced but per
  position values over the vocabulary's devices (never the kernel or its gradient)."""
  meshes = [(1, 8, 1, 1), (2, 2, 2, 1), (2, 1, 4, 1), (1, 2, 2, 2)]  # data, fsdp, tensor, expert
  result = subprocess.run([sys.executable, '-c', _ON_A_MESH, json.dumps(meshes)],
                          capture_output=True, text=True, timeout=300, env=helpers.env(8))
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  for mesh, found in report.items():
    assert max(found['loss'], found['grad_x'], found['grad_kernel']) < 1e-5, (mesh, found)
    tensor = json.loads(mesh)[2]
    # Per position: [batch rows, chunk 4] logsumexp parts, [.., 4, d_model 8] input gradients.
    allowed = [] if tensor == 1 else ['f32[2,4]', 'f32[2,4,8]', 'f32[4,4]', 'f32[4,4,8]']
    assert set(found['collectives_in_loops']) <= set(allowed), (mesh, found)
    # The parse finds what it looks for: the chunk loops, and the vocabulary's reductions.
    assert found['loop_bodies'] > 0 and (tensor == 1 or found['collectives_in_loops']), found
