"""Text generation with a KV cache: the model itself, called with a `KVCache`.

A batch of prompts is right-padded into one [batch, prompt bucket] array and prefilled at offset
0; each sequence's cache length is then set to its own prompt length, so the first generated
token of a short prompt overwrites its padding and the causal mask hides what lies beyond.
Decoding runs inside one jitted while-loop (one model call per token for the whole batch)
until every sequence has emitted EOS or max_new_tokens are out. (A mixture of experts with
capacity_factor > 0 routes the padding too, which can take capacity from real tokens; imported
models are dropless.)

Prefill and decode are each compiled once per shape bucket (batch rounded up to a power of two
that the mesh's batch axes divide; prompt length and max_new_tokens rounded up to powers of
two, at least 8) and timed apart, so their tokens/s are reported separately. Sampling:
temperature 0 is greedy (argmax); otherwise softmax(logits / temperature) restricted to the
top_k most likely tokens (0: all) and to the smallest set whose probability reaches top_p,
drawn with a jax.random key folded with the step.
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from gated_attention.distributed import CompileTimer
from gated_attention.model import KVCache, apply
from gated_attention.sharding import batch_sharding, named_sharding, replicated

CACHE_AXES = ('layers', 'batch', 'length', 'kv_heads', 'head_dim')
MIN_BUCKET = 8


@dataclasses.dataclass(frozen=True)
class Sampling:
  temperature: float = 0.0  # 0: greedy.
  top_k: int = 0  # 0: no cut.
  top_p: float = 1.0


@dataclasses.dataclass
class Generation:
  """tokens: the new ids of each prompt (up to and including EOS). timing: prefill_tokens (the
  prompts' ids), decode_tokens (new ids after each prompt's first, which prefill gives), their
  seconds and tokens/s, compile_seconds (not in the others) and compile_cache_hits (programs the
  compilation cache served)."""
  tokens: list[list[int]]
  timing: dict


def sample(logits: jax.Array, key: jax.Array, temperature, top_k, top_p) -> jax.Array:
  """Next ids [batch] from float32 logits [batch, vocab] (see the module docstring); the
  settings are traced values, so changing them compiles nothing."""
  vocab = logits.shape[-1]
  order = jnp.argsort(-logits, axis=-1)
  ranked = jnp.take_along_axis(logits, order, axis=-1) / jnp.maximum(temperature, 1e-6)
  rank = jnp.arange(vocab)
  keep = rank < jnp.where(top_k > 0, top_k, vocab)
  probs = jax.nn.softmax(jnp.where(keep, ranked, -jnp.inf), axis=-1)
  # A token is kept while the more likely ones before it hold less than top_p (the first
  # always is).
  keep &= (jnp.cumsum(probs, axis=-1) - probs) < top_p
  choice = jax.random.categorical(key, jnp.where(keep, ranked, -jnp.inf), axis=-1)
  sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
  return jnp.where(temperature > 0, sampled, order[:, 0]).astype(jnp.int32)


def bucket(size: int, multiple: int = 1, minimum: int = MIN_BUCKET) -> int:
  """The power of two >= size (at least `minimum`), rounded up to a multiple of `multiple`."""
  power = max(minimum, 1 << max(size - 1, 0).bit_length())
  return -(-power // multiple) * multiple


class Generator:
  """Prefill and decode of one model on one mesh, compiled once per shape bucket.

  graphdef, params: the model (params placed on `mesh`, e.g. by evaluate.restore_run);
  model_config: config.model."""

  def __init__(self, graphdef, params, model_config, mesh):
    self.graphdef, self.params, self.model_config, self.mesh = graphdef, params, model_config, mesh
    self.cache_dtype = jnp.dtype(model_config.dtype)
    self.batch_ways = mesh.shape['data'] * mesh.shape['fsdp'] * mesh.shape['expert']
    self._compiled: dict = {}

  def _cache_sharding(self, batch: int, length: int):
    cfg = self.model_config
    return named_sharding(self.mesh, CACHE_AXES,
                          (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim))

  def _prefill_fn(self, cache_length: int):
    def prefill(params, tokens, lengths, key, settings):
      """tokens [b, p] right-padded, lengths [b] -> (cache at the prompts' lengths, first new
      ids [b])."""
      cache = KVCache.empty(self.model_config, tokens.shape[0], cache_length, self.cache_dtype)
      out = apply(self.graphdef, params, tokens, cache=cache)
      last = jnp.take_along_axis(out.logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
      return out.cache._replace(length=lengths), sample(last, key, *settings)
    return prefill

  def _decode_fn(self, steps: int):
    def decode(params, cache, first, key, settings, max_new_tokens, eos_id, prompts):
      """Generates up to max_new_tokens (<= steps) ids for each of the first `prompts` rows
      (the rest pad the batch), the first id given; a row stops after eos_id (-1: never).
      Returns (ids [b, steps], counts [b])."""
      batch = first.shape[0]
      tokens = jnp.zeros((batch, steps), jnp.int32).at[:, 0].set(first)
      done = (first == eos_id) | (jnp.arange(batch) >= prompts)

      def not_finished(carry):
        step, _, _, done = carry
        return (step < max_new_tokens) & ~jnp.all(done)

      def generate_one(carry):
        step, cache, tokens, done = carry
        previous = jax.lax.dynamic_slice_in_dim(tokens, step - 1, 1, axis=1)
        out = apply(self.graphdef, params, previous, cache=cache)
        new = sample(out.logits[:, 0], jax.random.fold_in(key, step), *settings)
        tokens = tokens.at[:, step].set(jnp.where(done, 0, new))
        return step + 1, out.cache, tokens, done | (new == eos_id)

      step, _, tokens, _ = jax.lax.while_loop(not_finished, generate_one,
                                              (jnp.int32(1), cache, tokens, done))
      is_eos = (tokens == eos_id) & (jnp.arange(steps) < step)
      counts = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1, step)
      return tokens, counts
    return decode

  def _compile(self, batch: int, prompt_length: int, steps: int, args):
    """The compiled (prefill, decode) for one bucket."""
    key = (batch, prompt_length, steps)
    if key not in self._compiled:
      cache_sharding = self._cache_sharding(batch, prompt_length + steps)
      cache = KVCache(cache_sharding, cache_sharding, named_sharding(self.mesh, ('batch',)))
      with jax.set_mesh(self.mesh):
        prefill = jax.jit(self._prefill_fn(prompt_length + steps),
                          out_shardings=(cache, named_sharding(self.mesh, ('batch',))))
        abstract_cache, first = jax.eval_shape(prefill, *args)
        prefill = prefill.lower(*args).compile()
        # Outputs replicated: every process reads them whole, however the mesh spans hosts.
        decode = jax.jit(self._decode_fn(steps), out_shardings=replicated(self.mesh)).lower(
            self.params, abstract_cache, first, *args[3:], 0, 0, 0).compile()
      self._compiled[key] = (prefill, decode)
    return self._compiled[key]

  def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
               seed: int = 0, eos_id: int | None = None, batch_size: int = 8) -> Generation:
    """New ids for each prompt (lists of ids, non-empty), batch_size prompts at a time, greedy
    or sampled, each stopping after eos_id or max_new_tokens (>= 1)."""
    if max_new_tokens < 1:
      raise ValueError(f'max_new_tokens={max_new_tokens} must be >= 1.')
    empty = [index for index, prompt in enumerate(prompts) if not len(prompt)]
    if empty:
      raise ValueError(f'prompts {empty[:5]} are empty; a prompt holds at least one id (BOS).')
    tokens, totals = [], dict.fromkeys(('prefill_tokens', 'prefill_seconds', 'decode_tokens',
                                        'decode_seconds', 'compile_seconds',
                                        'compile_cache_hits'), 0)
    for start in range(0, len(prompts), batch_size):
      batch = prompts[start:start + batch_size]
      new, seconds, cache_hits = self._generate_batch(batch, max_new_tokens, sampling,
                                                      seed + start, eos_id)
      tokens += new
      totals['prefill_tokens'] += sum(len(p) for p in batch)
      totals['decode_tokens'] += sum(len(ids) - 1 for ids in new)  # The first is prefill's.
      totals['compile_cache_hits'] += cache_hits
      for name, value in seconds.items():
        totals[f'{name}_seconds'] += value
    for stage in ('prefill', 'decode'):
      totals[f'{stage}_tokens_per_sec'] = (totals[f'{stage}_tokens']
                                           / max(totals[f'{stage}_seconds'], 1e-9))
    return Generation(tokens, totals)

  def _generate_batch(self, prompts, max_new_tokens, sampling, seed, eos_id):
    """(new ids of each prompt, {'compile', 'prefill', 'decode': seconds}, programs the
    compilation cache served) for one batch."""
    batch = bucket(len(prompts), self.batch_ways, minimum=1)
    prompt_length = bucket(max(len(p) for p in prompts))
    steps = bucket(max_new_tokens)
    tokens = np.zeros((batch, prompt_length), np.int32)
    lengths = np.ones((batch,), np.int32)  # Rows past the prompts: a one-token dummy.
    for row, prompt in enumerate(prompts):
      tokens[row, :len(prompt)], lengths[row] = prompt, len(prompt)
    tokens = jax.device_put(tokens, batch_sharding(self.mesh))
    lengths = jax.device_put(lengths, named_sharding(self.mesh, ('batch',)))
    key = jax.random.key(seed)
    settings = (jnp.float32(sampling.temperature), jnp.int32(sampling.top_k),
                jnp.float32(sampling.top_p))
    args = (self.params, tokens, lengths, key, settings)

    with CompileTimer() as compile_timer:
      prefill, decode = self._compile(batch, prompt_length, steps, args)
    started = time.perf_counter()
    cache, first = jax.block_until_ready(prefill(*args))
    prefill_seconds = time.perf_counter() - started
    started = time.perf_counter()
    new, counts = jax.device_get(decode(self.params, cache, first, key, settings,
                                        max_new_tokens, -1 if eos_id is None else eos_id,
                                        len(prompts)))
    decode_seconds = time.perf_counter() - started
    return ([new[row, :counts[row]].tolist() for row in range(len(prompts))],
            {'compile': compile_timer.seconds, 'prefill': prefill_seconds,
             'decode': decode_seconds}, compile_timer.cache_hits)


def prompt_ids(tokenizer, text: str | bytes) -> list[int]:
  """A text prompt as the model reads it: BOS, then the text's ids (as every training
  example starts)."""
  return [tokenizer.bos_id, *tokenizer.encode(text).tolist()]
