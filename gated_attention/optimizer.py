"""AdamW with linear warmup, cosine decay to a floor, global-norm clipping, and weight decay on
matrices only (kernels and embeddings; never norms or gate score vectors)."""

import jax
import optax


def learning_rate_schedule(train_config) -> optax.Schedule:
  """The learning rate of update `count` + 1 (optax counts updates from 0): rising linearly to
  learning_rate at step warmup_steps (step 1 gets learning_rate / warmup_steps, not 0), then
  cosine down to min_learning_rate at step train.steps."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train_config.learning_rate,
      warmup_steps=train_config.warmup_steps,
      decay_steps=max(train_config.steps, train_config.warmup_steps + 1),
      end_value=train_config.min_learning_rate)
  return lambda count: schedule(count + 1)


def weight_decay_mask(params):
  """True for parameters with two or more dims that multiply activations (not gate scores); the
  stacked axis of scanned layers (model.scan_layers) does not count."""
  def decays(path, leaf):
    keys = [getattr(entry, 'key', None) for entry in path]
    dims = leaf.ndim - ('layers' in keys)
    return dims >= 2 and keys[-1] != 'score'
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(train_config) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(train_config.grad_clip),
      optax.adamw(learning_rate_schedule(train_config), b1=train_config.b1, b2=train_config.b2,
                  weight_decay=train_config.weight_decay, mask=weight_decay_mask))
