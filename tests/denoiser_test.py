"""The sampler's folded, feature-major ε_θ against the Flax module it rearranges."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmic_jax.nn import denoiser

B, C, F, T = 5, 3, 24, 12


def _model_and_variables(dtype=jnp.float32, width=1):
  model = denoiser.NoiseModel(num_classes=C, num_timesteps=T, feature_dim=F,
                              encoder=(("stage_sizes", (1,)), ("width", 4)),
                              conditioning_width=width, dtype=dtype)
  key = jax.random.PRNGKey(0)
  variables = model.init(key, jnp.zeros((2, 16, 16, 3)), jnp.zeros((2, C)),
                         jnp.zeros((2, C * width)), jnp.zeros((2,), jnp.int32), train=False)
  # Non-trivial BatchNorm: the fold must use every one of scale, bias, mean and var.
  leaves, treedef = jax.tree_util.tree_flatten(variables)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  leaves = [leaf * jax.random.uniform(k, leaf.shape, minval=0.5, maxval=1.5)
            + 0.1 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)]
  variables = jax.tree_util.tree_unflatten(treedef, leaves)
  variables["batch_stats"] = jax.tree_util.tree_map(jnp.abs, variables["batch_stats"])
  return model, variables


def _inputs(width=1):
  k = jax.random.split(jax.random.PRNGKey(2), 3)
  return (jax.random.normal(k[0], (B, F)), jax.random.normal(k[1], (B, C)),
          jax.random.normal(k[2], (B, C * width)))


def _reference(model, variables, features, y, cond, t):
  return model.apply(variables, features, y, cond, t, train=False,
                     method=denoiser.NoiseModel.denoise)


@pytest.mark.parametrize("layout", denoiser.LAYOUTS)
@pytest.mark.parametrize("width", [1, 2])
@pytest.mark.parametrize("t", [7, np.array([0, 3, 11, 5, 7])])
def test_folded_denoise_equals_the_module(width, t, layout):
  model, variables = _model_and_variables(width=width)
  features, y, cond = _inputs(width)
  t = jnp.asarray(t, jnp.int32)
  expected = _reference(model, variables, features, y, cond, t)
  folded = denoiser.fold_for_sampling(variables, layout=layout)
  got = jax.jit(denoiser.denoise_folded, static_argnums=5)(
      folded, features.T if layout == "feature_major" else features, y, cond, t, layout)
  assert got.shape == (B, C) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_sampling_layout_by_rows_per_product():
  assert denoiser.sampling_layout(32, 1) == denoiser.sampling_layout(2, 8) == "feature_major"
  assert denoiser.sampling_layout(1, 1) == "vector"
  assert denoiser.sampling_layout(1, 8) == "batch_major"
  # bfloat16 sampler weights: one image's chains all read the bfloat16 kernels (bf16_matvec).
  assert denoiser.sampling_layout(1, 8, "bfloat16") == denoiser.sampling_layout(1, 1, "bfloat16")
  assert denoiser.sampling_layout(1, 8, "bfloat16") == "vector"
  assert denoiser.sampling_layout(4, 1, "bfloat16") == "feature_major"
  with pytest.raises(ValueError, match="layout='rows'"):
    denoiser.fold_for_sampling(_model_and_variables()[1], layout="rows")


@pytest.mark.parametrize("layout", denoiser.LAYOUTS)
def test_folded_denoise_under_vmap_over_samples(layout):
  model, variables = _model_and_variables()
  features, y, cond = _inputs()
  ys = jnp.stack([y, 2 * y, -y])  # [S, B, C]: the sampler vmaps the chain over S keys
  folded = denoiser.fold_for_sampling(variables, layout=layout)
  t = jnp.asarray(4, jnp.int32)
  rho = features.T if layout == "feature_major" else features
  got = jax.jit(jax.vmap(lambda y: denoiser.denoise_folded(folded, rho, y, cond, t, layout)))(ys)
  for s in range(3):
    np.testing.assert_allclose(got[s], _reference(model, variables, features, ys[s], cond, t),
                               rtol=1e-5, atol=1e-5)


def test_folded_denoise_in_bfloat16():
  model, variables = _model_and_variables(dtype=jnp.bfloat16)
  features, y, cond = _inputs()
  t = jnp.asarray(3, jnp.int32)
  expected = _reference(model, variables, features, y, cond, t)
  folded = denoiser.fold_for_sampling(variables, jnp.bfloat16)
  assert folded["lin2"]["w"].dtype == jnp.bfloat16
  got = denoiser.denoise_folded(folded, features.T, y, cond, t)
  scale = float(jnp.max(jnp.abs(expected)))
  np.testing.assert_allclose(got, expected, atol=0.03 * scale)


def _kernels_rounded_to_bfloat16(variables):
  """The module's variables with every dense kernel of ε_θ rounded to bfloat16 (in float32)."""
  params = jax.tree_util.tree_map(lambda a: a, variables["params"])
  for lin in ("lin1", "lin2", "lin3"):
    dense = params[lin]["lin"]["dense"]
    dense["kernel"] = dense["kernel"].astype(jnp.bfloat16).astype(jnp.float32)
  dense = params["lin4"]["dense"]
  dense["kernel"] = dense["kernel"].astype(jnp.bfloat16).astype(jnp.float32)
  return {**variables, "params": params}


@pytest.mark.parametrize("layout", denoiser.LAYOUTS)
def test_bfloat16_sampler_weights_equal_the_module_with_rounded_kernels(layout):
  """diffusion.sampler_weights='bfloat16': every layout computes the module with its dense
  kernels rounded to bfloat16; 'vector' keeps them in bfloat16 (`bf16_matvec`), the others
  widen them back to float32, so an image gets the same ε̂ in any batch."""
  model, variables = _model_and_variables()
  features, y, cond = _inputs()
  t = jnp.asarray(np.array([0, 3, 11, 5, 7]), jnp.int32)
  expected = _reference(model, _kernels_rounded_to_bfloat16(variables), features, y, cond, t)
  unrounded = _reference(model, variables, features, y, cond, t)
  folded = denoiser.fold_for_sampling(variables, layout=layout, weights="bfloat16")
  stored = jnp.bfloat16 if layout == "vector" else jnp.float32
  assert all(folded[lin]["w"].dtype == stored for lin in ("lin1", "lin2", "lin3", "lin4"))
  got = jax.jit(denoiser.denoise_folded, static_argnums=5)(
      folded, features.T if layout == "feature_major" else features, y, cond, t, layout)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  assert float(jnp.max(jnp.abs(got - unrounded))) > 1e-3  # the rounding is real


def test_bad_sampler_weights_are_refused():
  with pytest.raises(ValueError, match="weights='int8'"):
    denoiser.fold_for_sampling(_model_and_variables()[1], weights="int8")
