"""Property tests of the linear-attention operators: recurrent == parallel == chunked."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxblocks.attention import linear_ops as L

SETTINGS = settings(max_examples=6, deadline=None, derandomize=True)
# Unoptimised XLA compiles: these tests compile many small programs and run each once.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                       "xla_llvm_disable_expensive_passes": True})


def make_inputs(seed, b, t, h, hk, kd, vd, gate, strength, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
  q, k, v = normal(b, t, h, kd), normal(b, t, hk, kd), normal(b, t, hk, vd)
  s0 = normal(b, hk, kd, vd).astype(jnp.float32)
  shape = {"none": None, "scalar": (b, t, hk), "vector": (b, t, hk, kd)}[gate]
  log_g = None
  if shape is not None:
    # weak: log-gates in about [-0.05, 0]; strong: about [-8, -1] (decays of e^-1 … e^-8 per step).
    u = rng.random(shape, np.float32)
    log_g = jnp.asarray(-(0.05 * u if strength == "weak" else 1.0 + 7.0 * u))
  return q, k, v, log_g, s0


def _loss_and_grads(form, q, k, v, log_g, s0, seg, **kw):
  """Values and gradients wrt q, k, v, log_g, initial state of a random projection of (o, S)."""
  rng = np.random.default_rng(7)
  o_w = rng.standard_normal((*q.shape[:3], v.shape[-1]), np.float32)
  s_w = rng.standard_normal(s0.shape, np.float32)

  def loss(q, k, v, log_g, s0):
    o, s = L.FORMS[form](q, k, v, log_g, initial_state=s0, segment_ids=seg, **kw)
    return jnp.sum(o * o_w) + jnp.sum(s * s_w), (o, s)

  argnums = (0, 1, 2, 4) if log_g is None else (0, 1, 2, 3, 4)
  (_, (o, s)), grads = jax.value_and_grad(loss, argnums=argnums, has_aux=True)(q, k, v, log_g, s0)
  return o, s, grads


def _close(a, b, rtol=2e-4, what=""):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = max(1.0, float(np.max(np.abs(b))))
  err = float(np.max(np.abs(a - b))) if a.size else 0.0
  assert err <= rtol * scale, f"{what}: max error {err} > {rtol} * {scale}"


def random_segments(rng, b, t, n_docs):
  """[b, t] segment ids with up to n_docs contiguous documents per row."""
  out = np.zeros((b, t), np.int32)
  for row in range(b):
    cuts = np.sort(rng.choice(np.arange(1, t), size=min(n_docs - 1, t - 1), replace=False)) if t > 1 else []
    out[row] = np.searchsorted(cuts, np.arange(t), side="right") + 3 * row
  return jnp.asarray(out)


@SETTINGS
@given(
    b=st.sampled_from([1, 2]),
    t=st.integers(1, 40),
    heads=st.sampled_from([(1, 1), (2, 2), (4, 2), (2, 1)]),
    kd=st.sampled_from([4, 8]),
    vd=st.sampled_from([3, 8]),
    gate=st.sampled_from(["none", "scalar", "vector"]),
    strength=st.sampled_from(["weak", "strong"]),
    chunks=st.sampled_from([(8, 4), (16, 4), (16, 16), (4, 2)]),
    n_docs=st.integers(1, 3),
    seed=st.integers(0, 1000),
)
def test_forms_agree_values_and_grads(b, t, heads, kd, vd, gate, strength, chunks, n_docs, seed):
  h, hk = heads
  q, k, v, log_g, s0 = make_inputs(seed, b, t, h, hk, kd, vd, gate, strength)
  seg = None if n_docs == 1 else random_segments(np.random.default_rng(seed), b, t, n_docs)
  def all_forms(q, k, v, log_g, s0, seg):
    return (_loss_and_grads("recurrent", q, k, v, log_g, s0, seg),
            _loss_and_grads("parallel", q, k, v, log_g, s0, seg),
            _loss_and_grads("chunk", q, k, v, log_g, s0, seg, chunk_size=chunks[0],
                            sub_chunk=chunks[1]))
  ref, par, chk = fast_jit(all_forms)(q, k, v, log_g, s0, seg)
  names = ["q", "k", "v"] + ([] if log_g is None else ["log_g"]) + ["initial_state"]
  for other, form in ((par, "parallel"), (chk, "chunk")):
    _close(other[0], ref[0], what=f"{form} output")
    _close(other[1], ref[1], what=f"{form} final state")
    for name, g_other, g_ref in zip(names, other[2], ref[2]):
      assert np.all(np.isfinite(np.asarray(g_other))), f"{form} grad {name} not finite"
      _close(g_other, g_ref, rtol=5e-4, what=f"{form} grad {name}")


def test_long_sequence_strong_decay_stays_finite():
  # 1024 tokens with decays down to e^-30 per step: cumulated log-gates reach ~-3e4, far beyond
  # float32 exp range; the chunked form must stay finite and equal the recurrence.
  b, t, h, kd, vd = 1, 1024, 2, 8, 8
  q, k, v, _, s0 = make_inputs(0, b, t, h, h, kd, vd, "none", "weak")
  log_g = jnp.asarray(-30.0 * np.random.default_rng(3).random((b, t, h, kd), np.float32))
  ref = fast_jit(functools.partial(_loss_and_grads, "recurrent"))(q, k, v, log_g, s0, None)
  chk = fast_jit(functools.partial(_loss_and_grads, "chunk"))(q, k, v, log_g, s0, None)
  _close(chk[0], ref[0], what="output")
  _close(chk[1], ref[1], what="state")
  for g_chk, g_ref in zip(chk[2], ref[2]):
    assert np.all(np.isfinite(np.asarray(g_chk)))
    _close(g_chk, g_ref, rtol=5e-4, what="grad")


@settings(max_examples=4, deadline=None, derandomize=True)
@given(lengths=st.lists(st.integers(1, 20), min_size=2, max_size=3),
       gate=st.sampled_from(["none", "scalar", "vector"]), seed=st.integers(0, 100))
def test_packed_equals_separate(lengths, gate, seed):
  t = sum(lengths)
  q, k, v, log_g, s0 = make_inputs(seed, 1, t, 2, 2, 4, 4, gate, "weak")
  seg = jnp.asarray(np.repeat(np.arange(len(lengths)) + 1, lengths)[None])
  cu = jnp.asarray(np.concatenate([[0], np.cumsum(lengths)]), jnp.int32)
  packed = fast_jit(functools.partial(L.chunk_gla, chunk_size=8, sub_chunk=4))
  o_p, s_p = packed(q, k, v, log_g, initial_state=s0, segment_ids=seg)
  o_cu, s_cu = packed(q, k, v, log_g, initial_state=s0, cu_seqlens=cu)
  _close(o_cu, o_p, rtol=1e-6, what="cu_seqlens output")
  _close(s_cu, s_p, rtol=1e-6, what="cu_seqlens state")
  start = 0
  for i, n in enumerate(lengths):
    sl = slice(start, start + n)
    g = None if log_g is None else log_g[:, sl]
    o_s, s_s = fast_jit(L.recurrent_gla)(q[:, sl], k[:, sl], v[:, sl], g,
                                         initial_state=s0 if i == 0 else None)
    _close(o_p[:, sl], o_s, what=f"document {i}")
    start += n
  _close(s_p, s_s, what="final state = state of the last document")


def test_step_matches_recurrent_and_gqa_shares_state():
  q, k, v, log_g, s0 = make_inputs(1, 2, 7, 4, 2, 4, 3, "vector", "weak")
  o_ref, s_ref = fast_jit(L.recurrent_gla)(q, k, v, log_g, initial_state=s0)
  state, outs, step = s0, [], fast_jit(L.gla_step)
  for t in range(7):
    o_t, state = step(q[:, t], k[:, t], v[:, t], log_g[:, t], state)
    outs.append(o_t)
  _close(jnp.stack(outs, 1), o_ref, rtol=1e-5, what="steps")
  _close(state, s_ref, rtol=1e-5, what="step state")
  # GQA: query heads 2h and 2h+1 read the state of kv head h, i.e. the same as repeating k, v, g.
  rep = lambda a: jnp.repeat(a, 2, axis=2)
  o_mha, _ = fast_jit(L.recurrent_gla)(q, rep(k), rep(v), rep(log_g),
                                       initial_state=jnp.repeat(s0, 2, 1))
  _close(o_ref, o_mha, rtol=1e-5, what="GQA vs repeated heads")


def test_bfloat16_inputs_within_tolerance():
  """bf16 inputs, float32 accumulation: the only extra error over the f32 computation on the
  same (rounded) inputs is the bf16 rounding of the output (≤ 2^-8 relative, stated: 1e-2 of the
  output scale); against unrounded f32 inputs the error stays within 3e-2 of the output scale."""
  q, k, v, log_g, s0 = make_inputs(2, 2, 50, 2, 2, 8, 8, "vector", "weak")
  bf = lambda a: a.astype(jnp.bfloat16)
  chunked = fast_jit(functools.partial(L.chunk_gla, chunk_size=16, sub_chunk=4))
  o_bf, s_bf = chunked(bf(q), bf(k), bf(v), bf(log_g), initial_state=s0)
  assert o_bf.dtype == jnp.bfloat16 and s_bf.dtype == jnp.float32
  up = lambda a: bf(a).astype(jnp.float32)
  o_r, s_r = fast_jit(L.recurrent_gla)(up(q), up(k), up(v), up(log_g), initial_state=s0)
  _close(o_bf, o_r, rtol=1e-2, what="bf16 vs f32 on rounded inputs")
  _close(s_bf, s_r, rtol=1e-4, what="bf16 state (float32) on rounded inputs")
  o_32, _ = fast_jit(L.recurrent_gla)(q, k, v, log_g, initial_state=s0)
  _close(o_bf, o_32, rtol=3e-2, what="bf16 vs f32")


def test_causal_conv_respects_prefix_and_documents():
  from jaxblocks.attention.short_conv import causal_conv as conv
  causal_conv = fast_jit(conv)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((1, 9, 3), np.float32))
  w = jnp.asarray(rng.standard_normal((4, 3), np.float32))
  y_full, _ = causal_conv(x, w)
  y_a, pre = causal_conv(x[:, :5], w)
  y_b, _ = causal_conv(x[:, 5:], w, prefix=pre)
  _close(jnp.concatenate([y_a, y_b], 1), y_full, rtol=1e-6, what="prefix continuation")
  seg = jnp.asarray([[1] * 4 + [2] * 5])
  y_seg, _ = causal_conv(x, w, segment_ids=seg)
  y_sep, _ = causal_conv(x[:, 4:], w)
  _close(y_seg[:, 4:], y_sep, rtol=1e-6, what="no leak across documents")
  _close(y_seg[:, :4], y_full[:, :4], rtol=1e-6, what="first document")


@pytest.mark.parametrize("bad, match", [
    (dict(k_shape=(2, 5, 4, 4)), "not divisible"),
    (dict(v_shape=(2, 4, 2, 3)), "v shape"),
    (dict(g_shape=(2, 5, 2, 3)), "log_g must have shape"),
    (dict(s_shape=(2, 2, 4, 4)), "initial_state must have shape"),
])
def test_bad_shapes_raise_clear_errors(bad, match):
  q = jnp.zeros((2, 5, 6, 4))
  k = jnp.zeros(bad.get("k_shape", (2, 5, 2, 4)))  # 6 query heads, 3 kv heads: not divisible
  v = jnp.zeros(bad.get("v_shape", (2, 5, 2, 3)))
  g = jnp.zeros(bad.get("g_shape", (2, 5, 2)))
  s = jnp.zeros(bad.get("s_shape", (2, 2, 4, 3)))
  for fn in (L.recurrent_gla, L.parallel_gla, L.chunk_gla):
    with pytest.raises(ValueError, match=match):
      fn(q, k, v, g, initial_state=s)


def test_chunk_size_must_be_multiple_of_sub_chunk():
  q = jnp.zeros((1, 4, 1, 2))
  with pytest.raises(ValueError, match="multiple of sub_chunk"):
    L.chunk_gla(q, q, q, chunk_size=12, sub_chunk=8)
