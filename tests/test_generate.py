"""Generation with a KV cache against the full forward pass, EOS, and sampling's distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gated_attention import state as state_lib
from gated_attention.generate import Generator, Sampling, bucket, sample
from gated_attention.model import KVCache, apply
from tests import helpers

PROMPTS = [[257, 5, 6, 7, 8, 9, 10], [257, 40], [257, 71, 72, 73]]  # Three lengths, one batch.


def _generator(model_cfg):
  graphdef, _ = state_lib.abstract_model(model_cfg)
  params = helpers.random_params(model_cfg)
  return Generator(graphdef, params, model_cfg, helpers.one_device_mesh())


def _greedy_by_full_forward(generator, prompts, generated):
  """The argmax of the full forward pass over each prompt + its generated ids, at each
  generated position: by causality, what re-running the model on the growing sequence would
  pick (the sequences are right-padded into one batch, which no earlier position sees)."""
  sequences = [prompt + new for prompt, new in zip(prompts, generated)]
  tokens = np.zeros((len(sequences), max(map(len, sequences))), np.int32)
  for row, sequence in enumerate(sequences):
    tokens[row, :len(sequence)] = sequence
  logits = jax.jit(lambda p, t: apply(generator.graphdef, p, t).logits)(generator.params, tokens)
  greedy = np.asarray(jnp.argmax(logits, axis=-1))
  return [greedy[row, len(prompt) - 1:len(sequence) - 1].tolist()
          for row, (prompt, sequence) in enumerate(zip(prompts, sequences))]


@pytest.mark.parametrize('variant, impl, scan, moe', [
    ('g1_elementwise', 'xla', False, False),
    ('g1_headwise', 'chunked', True, False),
    ('g2_headwise', 'chunked', False, False),
    ('g5', 'xla', True, False),
    ('none', 'chunked', False, True),
])
def test_greedy_generation_equals_rerunning_the_full_forward(variant, impl, scan, moe):
  overrides = dict(attention_impl=impl, scan_layers=scan)
  if moe:
    overrides['moe'] = dict(num_experts=4, top_k=2, expert_mlp_dim=16, shared_expert_dim=16)
  generator = _generator(helpers.model_config(variant, **overrides))
  generation = generator.generate(PROMPTS, max_new_tokens=9, batch_size=4)
  assert [len(generated) for generated in generation.tokens] == [9, 9, 9]
  assert generation.tokens == _greedy_by_full_forward(generator, PROMPTS, generation.tokens)
  timing = generation.timing
  assert timing['prefill_tokens'] == sum(map(len, PROMPTS))
  assert timing['decode_tokens'] == 3 * 8 and timing['decode_tokens_per_sec'] > 0


@pytest.fixture(scope='module')
def generator():
  return _generator(helpers.model_config('g1_elementwise', attention_impl='chunked'))


def test_eos_ends_one_sequence_and_not_the_others(generator):
  free = generator.generate(PROMPTS, max_new_tokens=8).tokens
  eos = free[0][3]
  stopped = generator.generate(PROMPTS, max_new_tokens=8, eos_id=eos).tokens
  for free_run, stopped_run in zip(free, stopped):
    end = free_run.index(eos) + 1 if eos in free_run else len(free_run)
    assert stopped_run == free_run[:end]
  assert stopped[0][-1] == eos and len(stopped[0]) <= 4


@pytest.mark.parametrize('prompts, max_new_tokens, message', [
    (PROMPTS, 0, 'max_new_tokens=0 must be >= 1'),
    ([[257, 5], []], 4, r'prompts \[1\] are empty'),
])
def test_nothing_to_generate_from_or_to_is_refused(generator, prompts, max_new_tokens, message):
  with pytest.raises(ValueError, match=message):
    generator.generate(prompts, max_new_tokens)


def test_a_call_past_the_kv_caches_end_gives_nan_logits_for_its_rows():
  """A write past the end would land on the last slots (dynamic_update_slice clamps): the rows
  that overflow read NaN, the others what the full forward gives."""
  model_cfg = helpers.model_config('g1_elementwise')
  graphdef, _ = state_lib.abstract_model(model_cfg)
  params = helpers.random_params(model_cfg)
  tokens = np.asarray(helpers.random_tokens(0, 2, 8, 256))
  cache = KVCache.empty(model_cfg, 2, 8, jnp.float32)
  cache = apply(graphdef, params, tokens[:, :6], cache=cache).cache
  cache = cache._replace(length=jnp.asarray([6, 5], jnp.int32))  # Row 1: two slots left.
  logits = apply(graphdef, params, tokens[:, 5:8], cache=cache).logits  # Row 0: 6 + 3 > 8.
  assert np.all(np.isnan(logits[0])) and not np.any(np.isnan(logits[1]))
  full = apply(graphdef, params, tokens[1:2, :8]).logits
  np.testing.assert_allclose(logits[1], full[0, 5:8], rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match='9 tokens do not fit a KV cache of max_length 8'):
    apply(graphdef, params, np.zeros((2, 9), np.int32), cache=KVCache.empty(model_cfg, 2, 8,
                                                                              jnp.float32))


def test_batches_give_what_single_prompts_give(generator):
  """Batch size and padding change nothing: each prompt alone generates the same ids."""
  together = generator.generate(PROMPTS, max_new_tokens=8, batch_size=3).tokens
  alone = [generator.generate([prompt], max_new_tokens=8).tokens[0] for prompt in PROMPTS]
  assert together == alone


def _draws(logits, temperature=1.0, top_k=0, top_p=1.0, count=20_000):
  keys = jax.random.split(jax.random.key(0), count)
  batch = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (count, len(logits)))
  draw = jax.jit(jax.vmap(lambda key, row: sample(row[None], key, temperature, top_k, top_p)[0]))
  return np.bincount(np.asarray(draw(keys, batch)), minlength=len(logits)) / count


LOGITS = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15]))


def test_sampling_follows_the_softmax_of_the_tempered_logits():
  np.testing.assert_allclose(_draws(LOGITS), np.exp(LOGITS), atol=0.015)
  tempered = np.exp(LOGITS / 2) / np.exp(LOGITS / 2).sum()
  np.testing.assert_allclose(_draws(LOGITS, temperature=2.0), tempered, atol=0.015)


def test_top_k_and_top_p_keep_the_most_likely_tokens_renormalised():
  top_two = np.array([0, 0.4, 0, 0.3, 0]) / 0.7
  np.testing.assert_allclose(_draws(LOGITS, top_k=2), top_two, atol=0.015)
  # 0.4 + 0.3 < 0.75, so the nucleus takes the third most likely (0.15) too.
  nucleus = np.array([0, 0.4, 0, 0.3, 0.15]) / 0.85
  np.testing.assert_allclose(_draws(LOGITS, top_p=0.75), nucleus, atol=0.015)


def test_temperature_zero_is_the_argmax_and_seeds_repeat(generator):
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)), jnp.float32)
  key = jax.random.key(3)
  np.testing.assert_array_equal(sample(logits, key, 0.0, 0, 1.0), jnp.argmax(logits, axis=-1))
  sampled = Sampling(temperature=1.0, top_k=50)
  first = generator.generate(PROMPTS, 8, sampled, seed=1).tokens
  assert generator.generate(PROMPTS, 8, sampled, seed=1).tokens == first
  assert generator.generate(PROMPTS, 8, sampled, seed=2).tokens != first


@pytest.mark.parametrize('size, multiple, minimum, expected', [
    (1, 1, 8, 8), (9, 1, 8, 16), (16, 1, 8, 16), (1, 1, 1, 1), (3, 3, 1, 6), (17, 4, 8, 32)])
def test_buckets_are_powers_of_two_split_evenly(size, multiple, minimum, expected):
  assert bucket(size, multiple, minimum) == expected
