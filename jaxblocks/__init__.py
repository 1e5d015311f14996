"""jaxblocks: efficient transformer building blocks for JAX/Flax on TPU and GPU.

Pure functions with logical-axis sharding annotations, ParamSpec trees for every block, and Flax
NNX modules over the same functions::

    import jax, jaxblocks as jb
    cfg = jb.ModelConfig(vocab_size=256, d_model=128, n_layers=4)
    params = jb.model.init(cfg, jax.random.key(0))
    logits = jb.model.apply(params, tokens, cfg)
"""

from jaxblocks import attention, blocks, mlp, model, nnx, norms, params, rope, sharding
from jaxblocks.attention.base import AttentionConfig
from jaxblocks.blocks import BlockConfig
from jaxblocks.config import ModelConfig
from jaxblocks.context import Context
from jaxblocks.errors import ConfigError
from jaxblocks.mlp import MlpConfig
from jaxblocks.norms import NormConfig
from jaxblocks.params import ParamSpec
from jaxblocks.sharding import PRESETS, Rules, constrain, make_mesh, use_rules

__version__ = "0.1.0"

__all__ = [
    "AttentionConfig", "BlockConfig", "ConfigError", "Context", "MlpConfig", "ModelConfig",
    "NormConfig", "PRESETS", "ParamSpec", "Rules", "attention", "blocks", "constrain",
    "make_mesh", "mlp", "model", "nnx", "norms", "params", "rope", "sharding", "use_rules",
]
