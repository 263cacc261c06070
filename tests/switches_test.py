"""Every paper/alternative config switch changes a value the expected way, checked against a
small numpy reference through the config -> `models.create_models` path (not only shapes)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmic_jax.diffusion import diffusion
from diffmic_jax.diffusion import losses
from diffmic_jax.diffusion import models
from diffmic_jax.nn import layers
from diffmic_jax.run import train_state
from diffmic_jax.training import train


def _bundle(tiny_config, **overrides):
  """(config, bundle, variables) of configs/test.py with 'group.field' overrides."""
  config = tiny_config()
  for field, value in overrides.items():
    group, name = field.split("__")
    config[group][name] = value
  bundle = models.create_models(config)
  variables = jax.jit(models.init_variables, static_argnums=(0, 2))(bundle, jax.random.PRNGKey(0),
                                                                    32)
  return config, bundle, variables


def _images(n=2):
  return jax.random.normal(jax.random.PRNGKey(1), (n, 32, 32, 3))


def _np_softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _recorded_inputs(module_type, fn):
  """Runs fn() and returns {module path: first positional input} of every `module_type` call."""
  seen = {}

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, module_type) and context.method_name == "__call__":
      seen.setdefault(context.module.scope.path, np.asarray(args[0], np.float64))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    out = fn()
  return seen, out


@pytest.mark.parametrize("value", ["first", "all"])
def test_crop_channels_feed_the_local_trunk(tiny_config, value):
  _, bundle, variables = _bundle(tiny_config, guidance__crop_channels=value)
  images = _images()
  is_local_trunk = lambda m: m.name == "local_net"
  seen = {}

  def interceptor(next_fun, args, kwargs, context):
    if is_local_trunk(context.module) and context.method_name == "__call__":
      seen["crops"] = np.asarray(args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    _, aux = bundle.guidance.apply(variables["guidance"], images, train=False)
  x = np.asarray(images)
  # 32 px image, 4x4 grid: ROI cell (r, c) is the 8x8 tile at (8r, 8c); K = 6 crops per image.
  expected = np.stack([x[b, 8 * r:8 * r + 8, 8 * c:8 * c + 8]
                       for b in range(2) for r, c in np.asarray(aux["roi_positions"][b])])
  if value == "first":  # official: channel 0 repeated to 3
    expected = np.repeat(expected[..., :1], 3, axis=-1)
  np.testing.assert_array_equal(seen["crops"], expected)


def test_top_t_percent_averages_the_top_cells(tiny_config):
  _, bundle, variables = _bundle(tiny_config, guidance__top_t_percent=0.25)
  logits, aux = bundle.guidance.apply(variables["guidance"], _images(), train=False)
  cam = np.asarray(aux["cam"], np.float64)  # [B, 4, 4, C]
  cells = np.sort(cam.reshape(2, 16, -1), axis=1)[:, ::-1]  # per class, descending
  np.testing.assert_allclose(logits["global"], cells[:, :4].mean(1), rtol=1e-5, atol=1e-6)
  assert not np.allclose(logits["global"], cells.mean(1), rtol=1e-3)


@pytest.mark.parametrize("value", ["unbiased", "biased"])
def test_bn_running_var_convention_in_every_batchnorm(tiny_config, value):
  _, bundle, variables = _bundle(tiny_config, model__bn_running_var=value)
  images = _images(4)
  y = jnp.full((4, 4), 0.25)
  t = jnp.array([0, 3, 6, 9])
  runs = {
      "guidance": lambda: bundle.guidance.apply(variables["guidance"], images, train=True,
                                                mutable=["batch_stats"]),
      "denoiser": lambda: bundle.denoiser.apply(variables["denoiser"], images, y, y, t,
                                                train=True, mutable=["batch_stats"]),
  }
  for name, run in runs.items():
    momenta = {}

    def interceptor(next_fun, args, kwargs, context):
      if isinstance(context.module, layers.BatchNorm):
        momenta[context.module.scope.path] = context.module.momentum
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      seen, (_, updated) = _recorded_inputs(layers.BatchNorm, run)
    assert len(seen) > 5
    for path, x in seen.items():
      flat = x.reshape(-1, x.shape[-1])
      batch_var = np.var(flat, axis=0, ddof=1 if value == "unbiased" else 0)
      stats = updated["batch_stats"]
      for key in path:
        stats = stats[key]
      m = momenta[path]
      old = variables[name]["batch_stats"]
      for key in path:
        old = old[key]
      np.testing.assert_allclose(stats["var"], m * np.asarray(old["var"]) + (1 - m) * batch_var,
                                 rtol=2e-4, atol=1e-6, err_msg=str((name, path)))


@pytest.mark.parametrize("prior,conditioning", [("fused", "prior"), ("zero", "dual"),
                                                ("fused", "dual"), ("zero", "prior")])
def test_prior_and_conditioning_switches(tiny_config, prior, conditioning):
  config = tiny_config()
  config.diffusion.prior = prior
  config.model.conditioning = conditioning
  bundle = models.create_models(config)
  rng = np.random.default_rng(0)
  logits = {k: jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
            for k in ("fused", "global", "local")}
  probs = {k: _np_softmax(v) for k, v in logits.items()}
  for stream, (mean, cond) in diffusion.stream_inputs(bundle.prior, bundle.conditioning,
                                                      logits).items():
    np.testing.assert_allclose(mean, 0.0 * probs[stream] if prior == "zero" else probs[stream],
                               rtol=1e-6, atol=1e-7)
    dual = np.concatenate([probs["global"], probs["local"]], -1)
    np.testing.assert_allclose(cond, dual if conditioning == "dual" else probs[stream], rtol=1e-6,
                               atol=1e-7)
  width = 3 if conditioning == "dual" else 2  # [y_t, ŷ_g, ŷ_l] or [y_t, ŷ]
  shapes = jax.eval_shape(lambda k: models.init_variables(bundle, k, 32), jax.random.PRNGKey(0))
  assert shapes["denoiser"]["params"]["lin1"]["lin"]["dense"]["kernel"].shape[0] == width * 4


def _numpy_mmd(x, y, scales):
  """Biased MMD² with k(a, b) = mean_s exp(−‖a − b‖²/(C²·s)), double loop in float64."""
  c = x.shape[1]
  k = lambda a, b: np.mean([np.exp(-np.sum((a - b) ** 2) / (c * c * s)) for s in scales])
  mean_k = lambda p, q: np.mean([[k(a, b) for b in q] for a in p])
  return mean_k(x, x) + mean_k(y, y) - 2 * mean_k(x, y)


@pytest.mark.parametrize("kernel,scales", [("gaussian", (1.0,)),
                                           ("multi", (0.25, 0.5, 1.0, 2.0, 4.0))])
def test_mmd_kernel_switch_reaches_the_objective(tiny_config, kernel, scales):
  _, bundle, variables = _bundle(tiny_config, diffusion__mmd_kernel=kernel)
  assert bundle.mmd_kernel == kernel
  images = _images(4)
  labels = jnp.array([0, 1, 2, 3])
  logits, _ = bundle.guidance.apply(variables["guidance"], images, train=False)
  d = variables["denoiser"]
  eps = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "denoise":  # one call per stream: fused, global, local
      eps[len(eps)] = np.asarray(out[0] if isinstance(out, tuple) else out, np.float64)
    return out

  with nn.intercept_methods(interceptor):
    loss, (_, aux) = losses.diffusion_objective(bundle, d["params"], d["batch_stats"], images,
                                                labels, logits,
                                                losses.draws(bundle, jax.random.PRNGKey(2), 4))
  # ε, drawn from the objective key's first half (the objective's documented key use).
  noise = np.asarray(jax.random.normal(jax.random.split(jax.random.PRNGKey(2))[0], (4, 4)),
                     np.float64)
  np.testing.assert_allclose(aux["mse"], np.mean((noise - eps[0]) ** 2), rtol=1e-5)
  np.testing.assert_allclose(aux["mmd_global"], _numpy_mmd(noise, eps[1], scales), rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(aux["mmd_local"], _numpy_mmd(noise, eps[2], scales), rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(loss, aux["mse"] + 0.5 * (aux["mmd_global"] + aux["mmd_local"]),
                             rtol=1e-6)


@pytest.mark.parametrize("terms", ["fused", "all"])
def test_guidance_loss_switch_in_the_warmup_step(tiny_config, terms):
  config, bundle, variables = _bundle(tiny_config, guidance__loss=terms)
  gtx, dtx, schedule = train_state.build_optimizers(config, 6)
  state = train_state.create_train_state(bundle, config, gtx, dtx, jax.random.PRNGKey(0),
                                   load_pretrained=False)
  batch = {"image": _images(4), "label": jnp.array([0, 1, 2, 3])}
  (logits, _), _ = bundle.guidance.apply(state.guidance, batch["image"], train=True,
                                         mutable=["batch_stats"])
  step = train.make_train_steps(bundle, config, gtx, dtx, schedule, 6)["warmup"]
  _, metrics = jax.jit(step)(state, batch)
  heads = ("fused",) if terms == "fused" else ("fused", "global", "local")
  labels = np.asarray(batch["label"])
  ce = lambda z: -np.mean(np.log(_np_softmax(z)[np.arange(4), labels]))
  np.testing.assert_allclose(metrics["dcg_loss"], sum(ce(logits[h]) for h in heads), rtol=1e-5)
