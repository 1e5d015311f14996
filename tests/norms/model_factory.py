"""Random parameters for small test models, drawn with NumPy from the model's spec tree (no
compilation, so property tests over many configs stay fast)."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxblocks import model
from jaxblocks import params as P

# Gains sit around 1, everything else around 0; all far enough from their inits that folding or
# re-centring mistakes show up.
_GAINS = ("scale", "alpha", "lambda", "eta", "bn_scale")


def random_params(cfg, seed: int, std: float = 0.3):
  rng = np.random.default_rng(seed)
  specs = model.specs(cfg)

  def draw(path, spec):
    name = str(path[-1].key) if path else ""
    value = std * rng.standard_normal(spec.shape)
    if name in _GAINS:
      value = value + 1.0
    if name == "scale" and path[0].key == "embed":
      value = value + np.sqrt(cfg.d_model)
    return jnp.asarray(value, spec.dtype)

  return jax.tree_util.tree_map_with_path(draw, specs, is_leaf=P.is_spec)
