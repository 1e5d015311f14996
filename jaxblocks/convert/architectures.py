"""Hugging Face architectures jaxblocks reads and writes.

Each :class:`Architecture` maps a ``config.json`` to a :class:`ModelConfig` (refusing options it
cannot express, by name), back to a ``config.json``, and describes where every jaxblocks parameter
lives in the checkpoint as a :mod:`jaxblocks.convert.lazy` expression tree (the same tree serves
import and export). Families: Llama (and Mistral, Qwen2), GPT-2, GPT-NeoX/Pythia, OLMo 2,
Gemma 2 and Gemma 3.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from jaxblocks.attention.base import AttentionConfig
from jaxblocks.blocks import BlockConfig
from jaxblocks.config import ModelConfig
from jaxblocks.convert.lazy import Expr, Stack, Tensor
from jaxblocks.mlp import MlpConfig
from jaxblocks.norms import NormConfig


class UnsupportedError(ValueError):
  """The checkpoint (or the model, on export) uses an option this converter cannot express."""


@dataclasses.dataclass(frozen=True)
class Architecture:
  name: str                       # the ``architectures[0]`` entry of config.json
  model_type: str
  to_config: Callable[[dict], ModelConfig]
  to_hf_config: Callable[[ModelConfig], dict]
  layout: Callable[[ModelConfig], Any]


ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> None:
  ARCHITECTURES[arch.name] = arch


def for_config(hf: dict) -> Architecture:
  """The architecture of a ``config.json`` (by ``architectures[0]``, else ``model_type``)."""
  names = hf.get("architectures") or []
  for name in names:
    if name in ARCHITECTURES:
      return ARCHITECTURES[name]
  by_type = {a.model_type: a for a in ARCHITECTURES.values()}
  if not names and hf.get("model_type") in by_type:
    return by_type[hf["model_type"]]
  raise UnsupportedError(f"unknown architecture {names or hf.get('model_type')!r}; supported: "
                         f"{sorted(ARCHITECTURES)}")


def get(name: str) -> Architecture:
  if name in ARCHITECTURES:
    return ARCHITECTURES[name]
  by_type = {a.model_type: a for a in ARCHITECTURES.values()}
  if name in by_type:
    return by_type[name]
  raise UnsupportedError(f"unknown architecture '{name}'; supported: {sorted(ARCHITECTURES)} "
                         f"(or model types {sorted(by_type)})")


# ----------------------------------------------------------------------------- config helpers


def _require(hf: dict, key: str, allowed, default=None):
  value = hf.get(key, default)
  if value not in allowed:
    raise UnsupportedError(f"config.json: {key}={value!r} is not supported (supported: "
                           f"{list(allowed)})")
  return value


def _rope(hf: dict, layer_type: str | None = None) -> dict:
  """``{'theta', 'fraction'}`` of the (per-layer-type) RoPE; only unscaled RoPE is supported."""
  params = hf.get("rope_parameters")
  if isinstance(params, dict) and layer_type is not None and layer_type in params:
    params = params[layer_type]
  if not isinstance(params, dict):
    scaling = hf.get("rope_scaling")
    params = dict(scaling or {})
    params.setdefault("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    if "rotary_pct" in hf:
      params.setdefault("partial_rotary_factor", hf["rotary_pct"])
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type != "default":
    raise UnsupportedError(f"config.json: rope type {rope_type!r} (rope_parameters/rope_scaling) "
                           "is not supported; only unscaled ('default') RoPE is")
  return {"theta": float(params.get("rope_theta", 10000.0)),
          "fraction": float(params.get("partial_rotary_factor", 1.0))}


def _window(hf: dict, n_layers: int, default_sliding: bool = True):
  """``(sliding_window, sliding_window_pattern)`` from ``sliding_window`` and ``layer_types``."""
  window = hf.get("sliding_window")
  layer_types = hf.get("layer_types")
  if window is None:
    if layer_types and "sliding_attention" in layer_types:
      raise UnsupportedError("config.json: layer_types has sliding_attention layers but "
                             "sliding_window is null")
    return None, None
  if not layer_types:
    return (int(window), None) if default_sliding else (None, None)
  if len(layer_types) != n_layers:
    raise UnsupportedError(f"config.json: layer_types has {len(layer_types)} entries for "
                           f"num_hidden_layers={n_layers}")
  for t in layer_types:
    if t not in ("sliding_attention", "full_attention"):
      raise UnsupportedError(f"config.json: layer type {t!r} in layer_types is not supported")
  flags = [t == "sliding_attention" for t in layer_types]
  if not any(flags):
    return None, None
  if all(flags):
    return int(window), None
  period = next(p for p in range(1, n_layers + 1)
                if all(flags[i] == flags[i % p] for i in range(n_layers)))
  return int(window), tuple(flags[:period])


def _layer_types(cfg: ModelConfig) -> list[str]:
  a = cfg.attention
  out = []
  for l in range(cfg.n_layers):
    local = a.sliding_window is not None and (
        a.sliding_window_pattern is None or a.sliding_window_pattern[l % len(a.sliding_window_pattern)])
    out.append("sliding_attention" if local else "full_attention")
  return out


def _rope_parameters(theta: float, fraction: float = 1.0) -> dict:
  p = {"rope_theta": float(theta), "rope_type": "default"}
  if fraction != 1.0:
    p["partial_rotary_factor"] = float(fraction)
  return p


RUNTIME_FIELDS = ("scan_layers", "remat", "remat_save", "dtype", "param_dtype", "init_std")


def config_differences(want: ModelConfig, got: ModelConfig) -> list[tuple[str, Any, Any]]:
  """``(key, want, got)`` for every model key that changes the function computed (runtime-only
  fields — scan/remat/dtypes/init/kernel impls — are ignored)."""
  a, b = _flat(want.to_dict()), _flat(got.to_dict())
  return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
          if k.split(".")[0] not in RUNTIME_FIELDS and not k.endswith(".impl")
          and a.get(k) != b.get(k)]


def _check_expressible(arch_name: str, cfg: ModelConfig, hf: dict,
                       to_config: Callable[[dict], ModelConfig]) -> dict:
  """Export guard: ``cfg`` must equal what importing ``hf`` gives (runtime-only fields aside)."""
  diff = config_differences(cfg, to_config(hf))
  if diff:
    raise UnsupportedError(f"the model is not expressible as {arch_name}: "
                           + ", ".join(f"model.{k}={w!r} (expressible: {g!r})" for k, w, g in diff))
  return hf


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
  return out


# ----------------------------------------------------------------------------- layout helpers


def _stacked(n_layers: int, layer: Callable[[int], Any]):
  """One pattern position holding every layer: ``[Stack over layers]`` per leaf."""
  trees = [layer(l) for l in range(n_layers)]
  return [jax.tree.map(lambda *xs: Stack(xs), *trees, is_leaf=lambda x: isinstance(x, Expr))]


def _linear_in_out(name: str, d_in: int, d_out: int) -> Expr:
  """A torch ``nn.Linear`` weight (stored ``[out, in]``) as ``[in, out]``."""
  return Tensor(name, (d_out, d_in)).T()


def _attention(prefix: str, cfg: ModelConfig, names=("q_proj", "k_proj", "v_proj", "o_proj"),
) -> dict:
  a, d = cfg.attention, cfg.d_model
  n, k, h = a.n_heads, a.kv_heads(), a.dim(d)
  q, kk, v, o = (f"{prefix}.{x}" for x in names)
  out = {
      "wq": _linear_in_out(f"{q}.weight", d, n * h).split(1, (n, h)),
      "wk": _linear_in_out(f"{kk}.weight", d, k * h).split(1, (k, h)),
      "wv": _linear_in_out(f"{v}.weight", d, k * h).split(1, (k, h)),
      "wo": _linear_in_out(f"{o}.weight", n * h, d).split(0, (n, h)),
  }
  if a.bias:
    out["bq"] = Tensor(f"{q}.bias", (n * h,)).split(0, (n, h))
    out["bk"] = Tensor(f"{kk}.bias", (k * h,)).split(0, (k, h))
    out["bv"] = Tensor(f"{v}.bias", (k * h,)).split(0, (k, h))
  if a.out_bias:
    out["bo"] = Tensor(f"{o}.bias", (d,))
  if a.qk_norm == "head":
    out["q_norm"] = Tensor(f"{prefix}.q_norm.weight", (h,))
    out["k_norm"] = Tensor(f"{prefix}.k_norm.weight", (h,))
  elif a.qk_norm == "full":
    out["q_norm"] = Tensor(f"{prefix}.q_norm.weight", (n * h,)).split(0, (n, h))
    out["k_norm"] = Tensor(f"{prefix}.k_norm.weight", (k * h,)).split(0, (k, h))
  return out


def _gated_mlp(prefix: str, cfg: ModelConfig) -> dict:
  d, f = cfg.d_model, cfg.mlp.hidden(cfg.d_model)
  out = {"w_gate": _linear_in_out(f"{prefix}.gate_proj.weight", d, f),
         "w_up": _linear_in_out(f"{prefix}.up_proj.weight", d, f),
         "w_down": _linear_in_out(f"{prefix}.down_proj.weight", f, d)}
  if cfg.mlp.bias:
    out["b_gate"] = Tensor(f"{prefix}.gate_proj.bias", (f,))
    out["b_up"] = Tensor(f"{prefix}.up_proj.bias", (f,))
    out["b_down"] = Tensor(f"{prefix}.down_proj.bias", (d,))
  return out


def _norm(name: str, cfg: ModelConfig) -> dict:
  out = {"scale": Tensor(f"{name}.weight", (cfg.d_model,))}
  if cfg.norm.bias:
    out["bias"] = Tensor(f"{name}.bias", (cfg.d_model,))
  return out


def _embed_and_head(cfg: ModelConfig, embed: str, final_norm: str, head: str) -> dict:
  out = {"embed": {"tokens": Tensor(embed, (cfg.vocab_size, cfg.d_model))},
         "final_norm": _norm(final_norm, cfg)}
  if not cfg.tie_embeddings:
    out["head"] = {"w": _linear_in_out(head, cfg.d_model, cfg.vocab_size)}
  return out


def _common(hf: dict) -> dict:
  return dict(vocab_size=int(hf["vocab_size"]), d_model=int(hf["hidden_size"]),
              n_layers=int(hf["num_hidden_layers"]),
              max_seq_len=int(hf.get("max_position_embeddings", 2048)),
              tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def _common_hf(cfg: ModelConfig, arch: str, model_type: str) -> dict:
  a = cfg.attention
  return {"architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size,
          "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
          "num_attention_heads": a.n_heads, "num_key_value_heads": a.kv_heads(),
          "head_dim": a.dim(cfg.d_model), "intermediate_size": cfg.mlp.hidden(cfg.d_model),
          "max_position_embeddings": cfg.max_seq_len,
          "tie_word_embeddings": cfg.tie_embeddings, "dtype": "float32"}


def _head_dim(hf: dict) -> int:
  return int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])


def _checked(keys_false: tuple[str, ...], hf: dict) -> None:
  for key in keys_false:
    if hf.get(key):
      raise UnsupportedError(f"config.json: {key}={hf[key]!r} is not supported")


# ----------------------------------------------------------------------------- Llama family


_LLAMA_LIKE = {  # architecture -> (model_type, qkv bias key or fixed, out bias)
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


def _llama_to_config(hf: dict) -> ModelConfig:
  model_type = hf.get("model_type", "llama")
  _require(hf, "hidden_act", ("silu",), "silu")
  _checked(("use_bidirectional_attention",), hf)
  if hf.get("pretraining_tp", 1) not in (1, None):
    pass  # tensor-parallel slicing during pretraining only; the weights are the same
  if model_type == "qwen2":
    qkv_bias, out_bias = True, False
    window, pattern = None, None
    if hf.get("use_sliding_window"):  # sliding window on the layers from max_window_layers on
      n = int(hf["num_hidden_layers"])
      layer_types = hf.get("layer_types") or [
          "sliding_attention" if i >= int(hf.get("max_window_layers", n)) else "full_attention"
          for i in range(n)]
      window, pattern = _window({**hf, "layer_types": layer_types}, n)
  else:
    qkv_bias = out_bias = bool(hf.get("attention_bias", False))
    window, pattern = _window(hf, int(hf["num_hidden_layers"]))
  rope = _rope(hf)
  return ModelConfig(
      **_common(hf), attention_pattern=("softmax",),
      norm=NormConfig(kind="rmsnorm", eps=float(hf.get("rms_norm_eps", 1e-6))),
      attention=AttentionConfig(
          n_heads=int(hf["num_attention_heads"]),
          n_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
          head_dim=_head_dim(hf), bias=qkv_bias, out_bias=out_bias, rope=True,
          rope_theta=rope["theta"], rotary_fraction=rope["fraction"], sliding_window=window,
          sliding_window_pattern=pattern),
      mlp=MlpConfig(kind="swiglu", d_ff=int(hf["intermediate_size"]),
                    bias=bool(hf.get("mlp_bias", False))),
      block=BlockConfig(topology="pre"), position_embedding="none", final_norm=True)


def _llama_hf(arch: str):
  model_type = _LLAMA_LIKE[arch]

  def to_hf(cfg: ModelConfig) -> dict:
    a = cfg.attention
    hf = _common_hf(cfg, arch, model_type)
    hf.update(hidden_act="silu", rms_norm_eps=cfg.norm.eps,
              rope_parameters=_rope_parameters(a.rope_theta, a.rotary_fraction))
    if model_type == "qwen2":
      types = _layer_types(cfg)
      hf.update(use_sliding_window=a.sliding_window is not None,
                sliding_window=a.sliding_window, layer_types=types,
                max_window_layers=next((i for i, t in enumerate(types)
                                        if t == "sliding_attention"), cfg.n_layers))
    else:
      hf.update(attention_bias=a.bias, sliding_window=a.sliding_window)
      if a.sliding_window_pattern is not None:
        hf["layer_types"] = _layer_types(cfg)
      if model_type == "llama":
        hf["mlp_bias"] = cfg.mlp.bias
    return _check_expressible(arch, cfg, hf, _llama_to_config)

  return to_hf


def _llama_layout(cfg: ModelConfig):
  def layer(l):
    p = f"model.layers.{l}"
    return {"attn_norm": _norm(f"{p}.input_layernorm", cfg),
            "attn": _attention(f"{p}.self_attn", cfg),
            "mlp_norm": _norm(f"{p}.post_attention_layernorm", cfg),
            "mlp": _gated_mlp(f"{p}.mlp", cfg)}
  out = _embed_and_head(cfg, "model.embed_tokens.weight", "model.norm", "lm_head.weight")
  out["layers"] = _stacked(cfg.n_layers, layer)
  return out


for _arch, _type in _LLAMA_LIKE.items():
  register(Architecture(_arch, _type, _llama_to_config, _llama_hf(_arch), _llama_layout))


# ----------------------------------------------------------------------------- OLMo 2


def _olmo2_to_config(hf: dict) -> ModelConfig:
  _require(hf, "hidden_act", ("silu",), "silu")
  rope = _rope(hf)
  eps = float(hf.get("rms_norm_eps", 1e-6))
  bias = bool(hf.get("attention_bias", False))
  return ModelConfig(
      **_common(hf), norm=NormConfig(kind="rmsnorm", eps=eps),
      attention=AttentionConfig(
          n_heads=int(hf["num_attention_heads"]),
          n_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
          head_dim=_head_dim(hf), bias=bias, out_bias=bias, qk_norm="full", qk_norm_eps=eps,
          rope_theta=rope["theta"], rotary_fraction=rope["fraction"]),
      mlp=MlpConfig(kind="swiglu", d_ff=int(hf["intermediate_size"])),
      block=BlockConfig(topology="olmo2"), final_norm=True)


def _olmo2_hf(cfg: ModelConfig) -> dict:
  a = cfg.attention
  hf = _common_hf(cfg, "Olmo2ForCausalLM", "olmo2")
  hf.pop("head_dim")
  hf.update(hidden_act="silu", rms_norm_eps=cfg.norm.eps, attention_bias=a.bias,
            rope_parameters=_rope_parameters(a.rope_theta, a.rotary_fraction))
  return _check_expressible("Olmo2ForCausalLM", cfg, hf, _olmo2_to_config)


def _olmo2_layout(cfg: ModelConfig):
  def layer(l):
    p = f"model.layers.{l}"
    return {"attn": _attention(f"{p}.self_attn", cfg),
            "attn_out_norm": _norm(f"{p}.post_attention_layernorm", cfg),
            "mlp": _gated_mlp(f"{p}.mlp", cfg),
            "mlp_out_norm": _norm(f"{p}.post_feedforward_layernorm", cfg)}
  out = _embed_and_head(cfg, "model.embed_tokens.weight", "model.norm", "lm_head.weight")
  out["layers"] = _stacked(cfg.n_layers, layer)
  return out


register(Architecture("Olmo2ForCausalLM", "olmo2", _olmo2_to_config, _olmo2_hf, _olmo2_layout))


# ----------------------------------------------------------------------------- Gemma 2 / 3


def _gemma_to_config(hf: dict) -> ModelConfig:
  gemma3 = hf.get("model_type") == "gemma3_text"
  _require(hf, "hidden_activation", ("gelu_pytorch_tanh",), "gelu_pytorch_tanh")
  _checked(("use_bidirectional_attention", "attention_bias"), hf)
  n_layers = int(hf["num_hidden_layers"])
  window, pattern = _window(hf, n_layers)
  eps = float(hf.get("rms_norm_eps", 1e-6))
  rope_full = _rope(hf, "full_attention")
  rope_local = _rope(hf, "sliding_attention") if gemma3 else rope_full
  if rope_full["fraction"] != 1.0 or rope_local["fraction"] != 1.0:
    raise UnsupportedError("config.json: partial_rotary_factor is not supported for Gemma")
  head_dim = _head_dim(hf)
  scalar = hf.get("query_pre_attn_scalar") or head_dim
  return ModelConfig(
      **{**_common(hf), "tie_embeddings": bool(hf.get("tie_word_embeddings", True))},
      norm=NormConfig(kind="rmsnorm", eps=eps, scale_offset=1.0),
      attention=AttentionConfig(
          n_heads=int(hf["num_attention_heads"]),
          n_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
          head_dim=head_dim, qk_norm="head" if gemma3 else "none", qk_norm_eps=eps,
          qk_norm_offset=1.0 if gemma3 else 0.0,
          rope_theta=rope_full["theta"],
          rope_theta_local=(rope_local["theta"] if gemma3 and window is not None
                            and rope_local["theta"] != rope_full["theta"] else None),
          sliding_window=window, sliding_window_pattern=pattern,
          softcap=hf.get("attn_logit_softcapping"), scale=float(scalar) ** -0.5),
      mlp=MlpConfig(kind="geglu", d_ff=int(hf["intermediate_size"])),
      block=BlockConfig(topology="peri"), scale_embeddings=True, final_norm=True,
      logit_softcap=hf.get("final_logit_softcapping"))


def _gemma_hf(arch: str, model_type: str):
  def to_hf(cfg: ModelConfig) -> dict:
    a = cfg.attention
    hf = _common_hf(cfg, arch, model_type)
    head_dim = a.dim(cfg.d_model)
    scalar = (a.scale ** -2) if a.scale is not None else head_dim
    scalar = int(round(scalar)) if abs(scalar - round(scalar)) < 1e-6 else scalar
    hf.update(hidden_activation="gelu_pytorch_tanh", rms_norm_eps=cfg.norm.eps,
              query_pre_attn_scalar=scalar, attn_logit_softcapping=a.softcap,
              final_logit_softcapping=cfg.logit_softcap, sliding_window=a.sliding_window,
              layer_types=_layer_types(cfg), attention_bias=False)
    if model_type == "gemma3_text":
      hf["rope_parameters"] = {
          "full_attention": _rope_parameters(a.rope_theta),
          "sliding_attention": _rope_parameters(a.rope_theta_local or a.rope_theta)}
    else:
      hf["rope_parameters"] = _rope_parameters(a.rope_theta)
    if a.sliding_window is None:
      hf["sliding_window"] = None
      hf["layer_types"] = ["full_attention"] * cfg.n_layers
    return _check_expressible(arch, cfg, hf, _gemma_to_config)
  return to_hf


def _gemma_layout(cfg: ModelConfig):
  def layer(l):
    p = f"model.layers.{l}"
    return {"attn_norm": _norm(f"{p}.input_layernorm", cfg),
            "attn": _attention(f"{p}.self_attn", cfg),
            "attn_out_norm": _norm(f"{p}.post_attention_layernorm", cfg),
            "mlp_norm": _norm(f"{p}.pre_feedforward_layernorm", cfg),
            "mlp": _gated_mlp(f"{p}.mlp", cfg),
            "mlp_out_norm": _norm(f"{p}.post_feedforward_layernorm", cfg)}
  out = _embed_and_head(cfg, "model.embed_tokens.weight", "model.norm", "lm_head.weight")
  out["layers"] = _stacked(cfg.n_layers, layer)
  return out


register(Architecture("Gemma2ForCausalLM", "gemma2", _gemma_to_config,
                      _gemma_hf("Gemma2ForCausalLM", "gemma2"), _gemma_layout))
register(Architecture("Gemma3ForCausalLM", "gemma3_text", _gemma_to_config,
                      _gemma_hf("Gemma3ForCausalLM", "gemma3_text"), _gemma_layout))


# ----------------------------------------------------------------------------- GPT-2


_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                     "relu": "relu"}


def _gpt2_to_config(hf: dict) -> ModelConfig:
  act = _require(hf, "activation_function", tuple(_GPT2_ACTIVATIONS), "gelu_new")
  _checked(("scale_attn_by_inverse_layer_idx", "add_cross_attention"), hf)
  if not hf.get("scale_attn_weights", True):
    raise UnsupportedError("config.json: scale_attn_weights=false is not supported")
  if not hf.get("tie_word_embeddings", True):
    raise UnsupportedError("config.json: tie_word_embeddings=false is not supported for GPT-2")
  d = int(hf["n_embd"])
  return ModelConfig(
      vocab_size=int(hf["vocab_size"]), d_model=d, n_layers=int(hf["n_layer"]),
      max_seq_len=int(hf["n_positions"]), tie_embeddings=True,
      norm=NormConfig(kind="layernorm", eps=float(hf.get("layer_norm_epsilon", 1e-5)), bias=True),
      attention=AttentionConfig(n_heads=int(hf["n_head"]), bias=True, out_bias=True, rope=False),
      mlp=MlpConfig(kind=_GPT2_ACTIVATIONS[act], d_ff=int(hf.get("n_inner") or 4 * d), bias=True),
      block=BlockConfig(topology="pre"), position_embedding="learned", final_norm=True)


def _gpt2_hf(cfg: ModelConfig) -> dict:
  act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}.get(cfg.mlp.kind)
  if act is None:
    raise UnsupportedError(f"the model is not expressible as GPT2LMHeadModel: model.mlp.kind="
                           f"{cfg.mlp.kind!r}")
  hf = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
        "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.attention.n_heads,
        "n_positions": cfg.max_seq_len, "n_inner": cfg.mlp.hidden(cfg.d_model),
        "activation_function": act, "layer_norm_epsilon": cfg.norm.eps,
        "tie_word_embeddings": True, "scale_attn_weights": True, "dtype": "float32"}
  return _check_expressible("GPT2LMHeadModel", cfg, hf, _gpt2_to_config)


def _gpt2_layout(cfg: ModelConfig):
  d, f = cfg.d_model, cfg.mlp.hidden(cfg.d_model)
  n = cfg.attention.n_heads
  h = d // n

  def layer(l):
    p = f"transformer.h.{l}"
    qkv_w = Tensor(f"{p}.attn.c_attn.weight", (d, 3 * d))  # Conv1D: [in, out]
    qkv_b = Tensor(f"{p}.attn.c_attn.bias", (3 * d,))
    attn = {}
    for i, (w, b) in enumerate((("wq", "bq"), ("wk", "bk"), ("wv", "bv"))):
      attn[w] = qkv_w.slice(1, i * d, (i + 1) * d).split(1, (n, h))
      attn[b] = qkv_b.slice(0, i * d, (i + 1) * d).split(0, (n, h))
    attn["wo"] = Tensor(f"{p}.attn.c_proj.weight", (d, d)).split(0, (n, h))
    attn["bo"] = Tensor(f"{p}.attn.c_proj.bias", (d,))
    return {"attn_norm": _norm(f"{p}.ln_1", cfg), "attn": attn,
            "mlp_norm": _norm(f"{p}.ln_2", cfg),
            "mlp": {"w_up": Tensor(f"{p}.mlp.c_fc.weight", (d, f)),
                    "b_up": Tensor(f"{p}.mlp.c_fc.bias", (f,)),
                    "w_down": Tensor(f"{p}.mlp.c_proj.weight", (f, d)),
                    "b_down": Tensor(f"{p}.mlp.c_proj.bias", (d,))}}
  return {"embed": {"tokens": Tensor("transformer.wte.weight", (cfg.vocab_size, d)),
                    "positions": Tensor("transformer.wpe.weight", (cfg.max_seq_len, d))},
          "layers": _stacked(cfg.n_layers, layer),
          "final_norm": _norm("transformer.ln_f", cfg)}


register(Architecture("GPT2LMHeadModel", "gpt2", _gpt2_to_config, _gpt2_hf, _gpt2_layout))


# ----------------------------------------------------------------------------- GPT-NeoX / Pythia


_NEOX_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                     "relu": "relu"}


def _neox_to_config(hf: dict) -> ModelConfig:
  act = _require(hf, "hidden_act", tuple(_NEOX_ACTIVATIONS), "gelu")
  if not hf.get("attention_bias", True):
    raise UnsupportedError("config.json: attention_bias=false is not supported for GPT-NeoX")
  rope = _rope(hf)
  parallel = bool(hf.get("use_parallel_residual", True))
  return ModelConfig(
      **_common(hf),
      norm=NormConfig(kind="layernorm", eps=float(hf.get("layer_norm_eps", 1e-5)), bias=True),
      attention=AttentionConfig(n_heads=int(hf["num_attention_heads"]), bias=True, out_bias=True,
                                rope_theta=rope["theta"], rotary_fraction=rope["fraction"]),
      mlp=MlpConfig(kind=_NEOX_ACTIVATIONS[act], d_ff=int(hf["intermediate_size"]), bias=True),
      block=BlockConfig(topology="parallel" if parallel else "pre"), final_norm=True)


def _neox_hf(cfg: ModelConfig) -> dict:
  a = cfg.attention
  act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}.get(cfg.mlp.kind, cfg.mlp.kind)
  hf = _common_hf(cfg, "GPTNeoXForCausalLM", "gpt_neox")
  for key in ("num_key_value_heads", "head_dim"):
    hf.pop(key)
  hf.update(hidden_act=act, layer_norm_eps=cfg.norm.eps, attention_bias=True,
            use_parallel_residual=cfg.block.topology == "parallel",
            rope_parameters=_rope_parameters(a.rope_theta, a.rotary_fraction))
  return _check_expressible("GPTNeoXForCausalLM", cfg, hf, _neox_to_config)


def _neox_layout(cfg: ModelConfig):
  d, f = cfg.d_model, cfg.mlp.hidden(cfg.d_model)
  n = cfg.attention.n_heads
  h = d // n

  def layer(l):
    p = f"gpt_neox.layers.{l}"
    # fused QKV, rows laid out [head, (q|k|v), head_dim]
    qkv_w = _linear_in_out(f"{p}.attention.query_key_value.weight", d, 3 * d).split(1, (n, 3 * h))
    qkv_b = Tensor(f"{p}.attention.query_key_value.bias", (3 * d,)).split(0, (n, 3 * h))
    attn = {}
    for i, (w, b) in enumerate((("wq", "bq"), ("wk", "bk"), ("wv", "bv"))):
      attn[w] = qkv_w.slice(2, i * h, (i + 1) * h)
      attn[b] = qkv_b.slice(1, i * h, (i + 1) * h)
    attn["wo"] = _linear_in_out(f"{p}.attention.dense.weight", d, d).split(0, (n, h))
    attn["bo"] = Tensor(f"{p}.attention.dense.bias", (d,))
    return {"attn_norm": _norm(f"{p}.input_layernorm", cfg), "attn": attn,
            "mlp_norm": _norm(f"{p}.post_attention_layernorm", cfg),
            "mlp": {"w_up": _linear_in_out(f"{p}.mlp.dense_h_to_4h.weight", d, f),
                    "b_up": Tensor(f"{p}.mlp.dense_h_to_4h.bias", (f,)),
                    "w_down": _linear_in_out(f"{p}.mlp.dense_4h_to_h.weight", f, d),
                    "b_down": Tensor(f"{p}.mlp.dense_4h_to_h.bias", (d,))}}
  out = _embed_and_head(cfg, "gpt_neox.embed_in.weight", "gpt_neox.final_layer_norm",
                        "embed_out.weight")
  out["layers"] = _stacked(cfg.n_layers, layer)
  return out


register(Architecture("GPTNeoXForCausalLM", "gpt_neox", _neox_to_config, _neox_hf, _neox_layout))
