"""Networks: shapes, exact parameter counts, ROI selection against numpy, BatchNorm modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from diffmic_jax.diffusion import models
from diffmic_jax.nn import dcg
from diffmic_jax.nn import denoiser
from diffmic_jax.nn import layers
from diffmic_jax.nn import resnet


@pytest.mark.parametrize("num_classes,denoiser_params,dcg_params", [
    (5, 108_436_037, 47_560_960), (7, 108_472_903, 47_569_152)])
def test_paper_parameter_counts(num_classes, denoiser_params, dcg_params):
  config = default.get_config()
  config.data.num_classes = num_classes
  bundle = models.create_models(config)
  shapes = jax.eval_shape(lambda k: models.init_variables(bundle, k, 224), jax.random.PRNGKey(0))
  assert models.count_parameters(shapes["denoiser"]["params"]) == denoiser_params
  assert models.count_parameters(shapes["guidance"]["params"]) == dcg_params


@pytest.mark.parametrize("name,count", [("resnet18", 11_176_512), ("resnet50", 23_508_032)])
def test_resnet_trunks_match_torchvision_counts(name, count):
  net = resnet.ResNet(**resnet.resnet_kwargs(name))
  shapes = jax.eval_shape(lambda k: net.init(k, jnp.zeros((1, 64, 64, 3)), train=False),
                          jax.random.PRNGKey(0))
  assert models.count_parameters(shapes["params"]) == count
  assert "layer4_0" in shapes["params"] and "downsample_conv" in shapes["params"]["layer4_0"]


def numpy_select_rois(attention_map, k):
  """Reference greedy selection: first-index argmax, chosen cells suppressed."""
  a = np.array(attention_map, np.float64)
  chosen = []
  for _ in range(k):
    flat = int(np.argmax(a))
    r, c = divmod(flat, a.shape[1])
    chosen.append((r, c))
    a[r, c] = -np.inf
  return np.array(chosen)


def test_roi_selection_matches_numpy_reference():
  rng = np.random.default_rng(0)
  for _ in range(5):
    saliency = rng.normal(size=(1, 7, 7, 3)).astype(np.float32)
    amap = dcg.normalize_saliency(jnp.asarray(saliency))[0]
    got = dcg.select_rois(amap, 6)
    np.testing.assert_array_equal(got, numpy_select_rois(np.asarray(amap), 6))


def test_roi_selection_ties_and_constant_map():
  tied = jnp.zeros((4, 4)).at[1, 2].set(1.0).at[3, 0].set(1.0).at[0, 3].set(0.5)
  got = np.asarray(dcg.select_rois(tied, 6))
  # Ties go to the first flat index; zero cells follow in flat order; all distinct.
  np.testing.assert_array_equal(got, [[1, 2], [3, 0], [0, 3], [0, 0], [0, 1], [0, 2]])
  constant = dcg.normalize_saliency(jnp.ones((1, 3, 3, 2)))
  assert not np.isnan(np.asarray(constant)).any()
  positions = np.asarray(dcg.select_rois(constant[0], 6))
  assert len({tuple(p) for p in positions}) == 6


def test_crops_equal_image_tiles():
  image = jnp.arange(32 * 32 * 3, dtype=jnp.float32).reshape(32, 32, 3)
  positions = jnp.array([[0, 0], [3, 1], [2, 3]])
  crops = dcg.extract_crops(image, positions, 8, (8.0, 8.0))
  for crop, (r, c) in zip(np.asarray(crops), np.asarray(positions)):
    np.testing.assert_array_equal(crop, np.asarray(image)[8 * r:8 * r + 8, 8 * c:8 * c + 8])


@pytest.fixture(scope="module")
def tiny(tiny_config):
  config = tiny_config()
  bundle = models.create_models(config)
  variables = jax.jit(models.init_variables, static_argnums=(0, 2))(bundle, jax.random.PRNGKey(0),
                                                                    32)
  return bundle, variables


def test_dcg_outputs(tiny):
  bundle, variables = tiny
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 32, 32, 3))
  logits, aux = bundle.guidance.apply(variables["guidance"], x, train=False)
  assert {k: v.shape for k, v in logits.items()} == {k: (3, 4) for k in ("fused", "global", "local")}
  np.testing.assert_allclose(logits["fused"], 0.5 * (logits["global"] + logits["local"]), rtol=1e-5,
                             atol=1e-6)
  assert aux["cam"].shape == (3, 4, 4, 4) and aux["roi_positions"].shape == (3, 6, 2)
  np.testing.assert_allclose(aux["attention"].sum(-1), 1.0, rtol=1e-5)
  # y_global with t = 100% is the mean of the saliency map.
  np.testing.assert_allclose(logits["global"], aux["cam"].mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
  for b in range(3):
    amap = dcg.normalize_saliency(aux["cam"][b:b + 1])[0]
    np.testing.assert_array_equal(aux["roi_positions"][b], numpy_select_rois(np.asarray(amap), 6))


def test_dcg_rejects_grid_smaller_than_k(tiny_config):
  config = tiny_config()
  config.data.image_size = 16  # 2x2 grid < 6 ROIs
  bundle = models.create_models(config)
  with pytest.raises(ValueError, match="num_rois=6"):
    jax.eval_shape(lambda k: models.init_variables(bundle, k, 16), jax.random.PRNGKey(0))


def test_denoiser_shapes_and_cached_encoder(tiny):
  bundle, variables = tiny
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 32, 32, 3))
  y = jnp.ones((3, 4)) / 4
  t = jnp.array([0, 5, 9])
  v = variables["denoiser"]
  eps = bundle.denoiser.apply(v, x, y, y, t, train=False)
  assert eps.shape == (3, 4) and eps.dtype == jnp.float32
  feats = bundle.denoiser.apply(v, x, train=False, method=denoiser.NoiseModel.encode)
  again = bundle.denoiser.apply(v, feats, y, y, t, train=False, method=denoiser.NoiseModel.denoise)
  np.testing.assert_allclose(eps, again, rtol=1e-6)
  table = v["params"]["lin1"]["embed"]["embedding"]
  assert table.shape == (11, 32) and float(table.min()) >= 0 and float(table.max()) < 1


def test_batchnorm_train_versus_eval():
  bn = layers.BatchNorm(momentum=0.9)
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 3)) * 3 + 2
  v = bn.init(jax.random.PRNGKey(0), x, train=False)
  y_train, updated = bn.apply(v, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(y_train.mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(y_train.std(0), 1, atol=1e-3)
  stats = updated["batch_stats"]
  np.testing.assert_allclose(stats["mean"], 0.1 * x.mean(0), rtol=1e-5)
  # PyTorch stores the unbiased variance in running_var.
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * np.var(np.asarray(x), 0, ddof=1), rtol=1e-5)
  y_eval = bn.apply(v, x, train=False)  # initial running stats: identity
  np.testing.assert_allclose(y_eval, x / np.sqrt(1 + 1e-5), rtol=1e-5)


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_batch_moments_match_float64_when_the_mean_dwarfs_the_spread(offset):
  """One pass over x, yet float32-accurate at mean/std = 1e5 (where E[x²] − E[x]² loses every
  digit), and with the first example, the shift, far from the rest of the batch."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((16, 5, 5, 3)) * np.array([1.0, 0.01, 100.0]) + offset
  x[0] += 8 * np.array([1.0, 0.01, 100.0])  # (E[x] − shift)² about 12·Var, the bound being 16
  x32 = x.astype(np.float32).astype(np.float64)  # the float32 input, exactly
  for axes in ((0, 1, 2), (0,)):
    sample = x32 if len(axes) == 3 else x32[:, 0, 0]
    mean, var = layers.batch_moments(jnp.asarray(sample, jnp.float32), axes)
    std = sample.std(axes)
    np.testing.assert_array_less(np.abs(mean - sample.mean(axes)) / std, 1e-5)
    np.testing.assert_allclose(var, sample.var(axes), rtol=2e-5)


def test_batch_moments_gradients_are_the_closed_forms():
  """d(Σ w·Var)/dx = 2w(x − mean)/N and d(Σ w·mean)/dx = w/N, N = elements per feature."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((6, 4, 4, 3)) * 2 + 5
  w = rng.standard_normal(3)
  n = x.size // 3
  def weighted(which):
    return lambda v: jnp.sum(layers.batch_moments(v, (0, 1, 2))[which] * w)
  x32 = jnp.asarray(x, jnp.float32)
  np.testing.assert_allclose(jax.grad(weighted(1))(x32), 2 * w * (x - x.mean((0, 1, 2))) / n,
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(jax.grad(weighted(0))(x32), np.broadcast_to(w / n, x.shape),
                             rtol=1e-5)


def test_bad_choice_names_the_field(tiny_config):
  config = tiny_config()
  config.guidance.backbone = "vgg"
  with pytest.raises(ValueError, match="guidance.backbone"):
    models.create_models(config)


def test_stream_inputs_prior_and_conditioning_switches(tiny_config):
  logits = {"fused": jnp.array([[2.0, 0.0, 0.0, 0.0]]), "global": jnp.array([[0.0, 1.0, 0.0, 0.0]]),
            "local": jnp.array([[0.0, 0.0, 3.0, 0.0]])}
  config = tiny_config()
  official = models.stream_inputs(models.create_models(config), logits)
  for name in ("fused", "global", "local"):
    mean, cond = official[name]
    np.testing.assert_allclose(mean, jax.nn.softmax(logits[name]), rtol=1e-6)
    np.testing.assert_array_equal(cond, mean)
  config.diffusion.prior = "zero"
  config.model.conditioning = "dual"
  paper = models.stream_inputs(models.create_models(config), logits)
  mean, cond = paper["fused"]
  np.testing.assert_array_equal(mean, 0.0)
  np.testing.assert_allclose(cond, jnp.concatenate([jax.nn.softmax(logits["global"]),
                                                    jax.nn.softmax(logits["local"])], -1),
                             rtol=1e-6)


def test_schedule_dtype_switch_reaches_the_schedule(tiny_config):
  config = tiny_config()
  official = models.create_models(config).schedule()
  config.diffusion.schedule_dtype = "float64"
  switched = models.create_models(config).schedule()
  np.testing.assert_array_equal(
      switched.alphas_cumprod, np.cumprod(1.0 - np.linspace(1e-4, 0.02, 10)).astype(np.float32))
  assert not np.array_equal(official.alphas_cumprod, switched.alphas_cumprod)
  config.diffusion.schedule_dtype = "half"
  with pytest.raises(ValueError, match="diffusion.schedule_dtype"):
    models.create_models(config)


@pytest.mark.parametrize("ablation,heads", [("basic", ["classifier"]), ("c1", ["classifier"]),
                                            ("c2", ["dcg_fused", "dcg_global", "dcg_local"]),
                                            ("full", ["dcg_fused", "dcg_global", "dcg_local"])])
def test_models_carry_their_report_heads(tiny_config, ablation, heads):
  config = tiny_config()
  config.ablation = ablation
  bundle = models.create_models(config)
  assert [name for name, _ in bundle.guidance_heads] == heads
  assert all(key in ("fused", "global", "local") for _, key in bundle.guidance_heads)
