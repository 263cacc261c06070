"""Weight conversion: torchvision ResNets and official DiffMIC checkpoints against torch forwards.

torch (CPU) is an optional test dependency: `pip install torch==2.13.0`; skipped without it.
The torch models are written here in torchvision's / the official code's layout (PyPI
torchvision is not needed).
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import app
from absl import flags

from configs import test as test_config
from diffmic_jax import convert
from diffmic_jax.diffusion import models as models_lib
from diffmic_jax.nn import pretrained
from diffmic_jax.nn import resnet

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# torchvision-layout ResNets, written by hand.


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(out + identity)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(out + identity)


class TorchResNet(nn.Module):
  """torchvision.models.ResNet (v1.5: stride on the 3×3 of the bottleneck)."""

  def __init__(self, block, layers, width=64, num_classes=1000):
    super().__init__()
    self.inplanes = width
    self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    for i, n in enumerate(layers):
      setattr(self, f"layer{i + 1}", self._make_layer(block, width * 2**i, n, 1 if i == 0 else 2))
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(self.inplanes, num_classes)
    self.num_layers = len(layers)

  def _make_layer(self, block, planes, blocks, stride):
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(
          nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
          nn.BatchNorm2d(planes * block.expansion))
    layers = [block(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * block.expansion
    layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def trunk(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    for i in range(self.num_layers):
      x = getattr(self, f"layer{i + 1}")(x)
    return x


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def randomize_(module, seed):
  """Random weights and BatchNorm statistics that keep activations O(1) in eval mode."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in module.state_dict().items():
      if not t.is_floating_point():
        continue
      u = torch.rand(t.shape, generator=g)
      n = torch.randn(t.shape, generator=g)
      if name.endswith("running_var"):
        t.copy_(0.5 + u)
      elif name.endswith("running_mean") or name.endswith("bias"):
        t.copy_(0.1 * n)
      elif t.ndim == 1:  # BatchNorm weight
        t.copy_(0.3 + 0.4 * u)
      elif name.endswith("embed.weight"):
        t.copy_(u)
      else:  # conv / linear weights, fan-in scaled
        t.copy_(n * (2.0 / (t[0].numel())) ** 0.5)
  return module


def tiny_torch_resnet(block, stage_sizes, width, seed):
  return randomize_(TorchResNet(BLOCKS[block], stage_sizes, width, num_classes=5).eval(), seed)


def save_pth(obj, path):
  torch.save(obj, path)
  return str(path)


def our_trunk_forward(flat, signature, images_nchw):
  model = resnet.ResNet(stage_sizes=signature.stage_sizes, block=signature.block,
                        width=signature.width)
  variables = pretrained.unflatten({k: jnp.asarray(v) for k, v in flat.items()})
  x = jnp.asarray(images_nchw.numpy().transpose(0, 2, 3, 1))
  pooled, aux = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  return np.asarray(pooled), np.asarray(aux["feature_map"])


# ---------------------------------------------------------------------------------------------
# torchvision conversion.


@pytest.mark.parametrize("arch,block,stages,size", [
    ("resnet18", "basic", (2, 2, 2, 2), 64),
    ("resnet50", "bottleneck", (3, 4, 6, 3), 32),
])
def test_torchvision_resnet_features_match(tmp_path, arch, block, stages, size):
  net = tiny_torch_resnet(block, stages, 64, seed=1)
  src = save_pth(net.state_dict(), tmp_path / f"{arch}.pth")
  out = str(tmp_path / f"{arch}.npz")
  summary = convert.convert_torchvision_file(src, out, arch)
  assert "fc.weight" in summary["ignored"] and "fc.bias" in summary["ignored"]
  flat, signature = pretrained.load_trunk(out)
  assert signature == pretrained.architecture_signature(arch)
  images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    ref_map = net.trunk(images)
  pooled, fmap = our_trunk_forward(flat, signature, images)
  ref_map = ref_map.numpy().transpose(0, 2, 3, 1)
  scale = max(1.0, float(np.abs(ref_map).max()))
  np.testing.assert_allclose(fmap, ref_map, atol=1e-4 * scale)
  np.testing.assert_allclose(pooled, ref_map.mean(axis=(1, 2)), atol=1e-4 * scale)


def test_safetensors_and_npz_inputs_match_pth(tmp_path):
  net = tiny_torch_resnet("basic", (1, 1), 8, seed=2)
  sd = {k: v.numpy() for k, v in net.state_dict().items()}
  np.savez(tmp_path / "raw.npz", **sd)
  via_pth, _ = pretrained.load_trunk(save_pth(net.state_dict(), tmp_path / "raw.pth"))
  via_npz, _ = pretrained.load_trunk(str(tmp_path / "raw.npz"))
  assert via_pth.keys() == via_npz.keys()
  for k in via_pth:
    np.testing.assert_array_equal(via_pth[k], via_npz[k])
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  safetensors_numpy.save_file({k: np.ascontiguousarray(v) for k, v in sd.items()},
                              str(tmp_path / "raw.safetensors"))
  via_st, _ = pretrained.load_trunk(str(tmp_path / "raw.safetensors"))
  for k in via_pth:
    np.testing.assert_array_equal(via_pth[k], via_st[k])


def _tiny_sd(block="basic"):
  return {k: v.numpy() for k, v in tiny_torch_resnet(block, (1, 1), 8, seed=3).state_dict().items()}


def test_wrong_architecture_is_named():
  net = tiny_torch_resnet("basic", (2, 2, 2, 2), 64, 0)
  sd = {k: v.numpy() for k, v in net.state_dict().items()}
  with pytest.raises(pretrained.WeightMismatchError,
                     match=r"basic blocks.*not the requested resnet50"):
    pretrained.convert_torchvision(sd, "resnet50", source="r18.pth")


def test_missing_key_is_named():
  sd = _tiny_sd()
  del sd["layer2.0.downsample.1.running_var"]
  with pytest.raises(pretrained.WeightMismatchError,
                     match=r"f\.pth: missing tensor 'layer2\.0\.downsample\.1\.running_var'"):
    pretrained.convert_torchvision(sd, source="f.pth")


def test_extra_key_is_named():
  sd = _tiny_sd()
  sd["layer1.0.se.weight"] = np.zeros((8, 8), np.float32)
  with pytest.raises(pretrained.WeightMismatchError,
                     match=r"f\.pth: 1 unexpected tensor.*'layer1\.0\.se\.weight'"):
    pretrained.convert_torchvision(sd, source="f.pth")


def test_wrong_shape_is_named():
  sd = _tiny_sd()
  sd["layer1.0.conv2.weight"] = np.zeros((8, 8, 5, 5), np.float32)
  with pytest.raises(pretrained.WeightMismatchError,
                     match=r"'layer1\.0\.conv2\.weight' has shape \(8, 8, 5, 5\)"):
    pretrained.convert_torchvision(sd, source="f.pth")


def test_not_a_resnet_is_rejected():
  with pytest.raises(pretrained.WeightMismatchError, match="expected a torchvision ResNet"):
    pretrained.convert_torchvision({"features.0.weight": np.zeros((3,))}, source="vgg.pth")


# ---------------------------------------------------------------------------------------------
# load_configured.


def tiny_config():
  """configs/test.py (32 px, width-8 two-stage trunks, T=10) with 3 classes and F=16."""
  cfg = test_config.get_config()
  cfg.data.num_classes = 3
  cfg.guidance.attention_dim = 16
  cfg.model.feature_dim = 16
  return cfg


def _init(cfg):
  """Models and zero-filled variables of the right structure (cheaper than a real init)."""
  models = models_lib.create_models(cfg)
  abstract = jax.eval_shape(lambda k: models_lib.init_variables(models, k, 32),
                            jax.random.PRNGKey(0))
  return models, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract)


def test_load_configured_fills_both_dcg_trunks_and_encoder(tmp_path):
  cfg = tiny_config()
  g_file = str(tmp_path / "g.npz")
  e_file = str(tmp_path / "e.pth")
  g_sd = tiny_torch_resnet("bottleneck", (1, 1), 8, seed=4).state_dict()
  torch.save(g_sd, tmp_path / "g.pth")
  convert.convert_torchvision_file(str(tmp_path / "g.pth"), g_file, None)
  save_pth(tiny_torch_resnet("basic", (1, 1), 8, seed=5).state_dict(), e_file)  # raw .pth works
  _, variables = _init(cfg)
  assert pretrained.load_configured(variables, cfg) is variables  # nothing configured
  cfg.guidance.pretrained = g_file
  cfg.model.encoder_pretrained = e_file
  loaded = pretrained.load_configured(variables, cfg)
  g_flat, _ = pretrained.load_trunk(g_file)
  e_flat, _ = pretrained.load_trunk(e_file)
  for trunk in ("global_net", "local_net"):
    got = pretrained.flatten({c: loaded["guidance"][c][trunk] for c in ("params", "batch_stats")})
    assert got.keys() == g_flat.keys()
    for k in got:
      np.testing.assert_array_equal(np.asarray(got[k]), g_flat[k])
  got = pretrained.flatten({c: loaded["denoiser"][c]["encoder_net"]
                            for c in ("params", "batch_stats")})
  for k in got:
    np.testing.assert_array_equal(np.asarray(got[k]), e_flat[k])
  # The rest is untouched.
  np.testing.assert_array_equal(np.asarray(loaded["guidance"]["params"]["saliency"]["kernel"]),
                                np.asarray(variables["guidance"]["params"]["saliency"]["kernel"]))
  # Works under eval_shape too (train_state.abstract_train_state traces create_train_state).
  abstract = jax.eval_shape(lambda v: pretrained.load_configured(v, cfg), variables)
  assert jax.tree.structure(abstract) == jax.tree.structure(loaded)


def test_load_configured_wrong_trunk_is_named(tmp_path):
  cfg = tiny_config()
  path = str(tmp_path / "basic.npz")
  save_pth(tiny_torch_resnet("basic", (1, 1), 8, seed=6).state_dict(), tmp_path / "b.pth")
  convert.convert_torchvision_file(str(tmp_path / "b.pth"), path, None)
  cfg.guidance.pretrained = path
  _, variables = _init(cfg)
  with pytest.raises(pretrained.WeightMismatchError,
                     match=r"basic.npz holds a custom \(basic blocks.*guidance/global_net is a "
                           r"custom \(bottleneck blocks"):
    pretrained.load_configured(variables, cfg)


def _cli(*argv):
  fv = flags.FlagValues()
  convert.define_flags(fv)
  fv(["convert", *argv])
  return fv


def test_cli_torchvision(tmp_path, capsys):
  src = save_pth(tiny_torch_resnet("basic", (2, 2, 2, 2), 64, 7).state_dict(), tmp_path / "r.pth")
  out = tmp_path / "r.npz"
  convert.run_command("torchvision", _cli("--arch=resnet18", f"--input={src}", f"--output={out}"))
  assert out.exists() and "resnet18" in capsys.readouterr().out
  with pytest.raises(pretrained.WeightMismatchError, match="not the requested resnet50"):
    convert.run_command("torchvision", _cli("--arch=resnet50", f"--input={src}", f"--output={out}"))
  with pytest.raises(app.UsageError, match="--input"):
    convert.run_command("torchvision", _cli("--arch=resnet18", f"--output={out}"))
  with pytest.raises(app.UsageError, match=r"one of \['official', 'torchvision'\]"):
    convert.run_command("tochvision", _cli())


def test_cli_is_a_module():
  """`python -m diffmic_jax.convert` without a command prints the usage and fails."""
  run = subprocess.run([sys.executable, "-m", "diffmic_jax.convert"], cwd=REPO,
                       capture_output=True, text=True, check=False,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert run.returncode != 0 and "COMMAND is one of" in run.stderr


# ---------------------------------------------------------------------------------------------
# Official DiffMIC checkpoints: the same math written in torch with the official key names.


class OfficialTrunk(nn.Module):
  """The official wrappers: torchvision children (minus fc, optionally avgpool) in `f`."""

  def __init__(self, net, keep_avgpool):
    super().__init__()
    self.f = nn.Sequential(*[m for n, m in net.named_children()
                             if n != "fc" and (keep_avgpool or n != "avgpool")])


class ConditionalLinear(nn.Module):

  def __init__(self, num_in, num_out, n_steps):
    super().__init__()
    self.num_out = num_out
    self.lin = nn.Linear(num_in, num_out)
    self.embed = nn.Embedding(n_steps, num_out)

  def forward(self, x, t):
    return self.embed(t).view(-1, self.num_out) * self.lin(x)


class EncoderX(nn.Module):

  def __init__(self, net, feature_dim):
    super().__init__()
    self.f = OfficialTrunk(net, keep_avgpool=True).f
    self.g = nn.Linear(net.fc.in_features, feature_dim)

  def forward(self, x):
    return self.g(torch.flatten(self.f(x), start_dim=1))


class ConditionalModel(nn.Module):
  """model.py's ConditionalModel with guidance=True."""

  def __init__(self, encoder, num_classes, feature_dim, n_steps):
    super().__init__()
    self.encoder_x = EncoderX(encoder, feature_dim)
    self.norm = nn.BatchNorm1d(feature_dim)
    self.lin1 = ConditionalLinear(num_classes * 2, feature_dim, n_steps)
    self.unetnorm1 = nn.BatchNorm1d(feature_dim)
    self.lin2 = ConditionalLinear(feature_dim, feature_dim, n_steps)
    self.unetnorm2 = nn.BatchNorm1d(feature_dim)
    self.lin3 = ConditionalLinear(feature_dim, feature_dim, n_steps)
    self.unetnorm3 = nn.BatchNorm1d(feature_dim)
    self.lin4 = nn.Linear(feature_dim, num_classes)

  def forward(self, x, y, t, yhat):
    x = self.norm(self.encoder_x(x))
    y = torch.cat([y, yhat], dim=-1)
    y = x * F.softplus(self.unetnorm1(self.lin1(y, t)))
    y = F.softplus(self.unetnorm2(self.lin2(y, t)))
    y = F.softplus(self.unetnorm3(self.lin3(y, t)))
    return self.lin4(y)


class PostProcessing(nn.Module):

  def __init__(self, features, num_classes):
    super().__init__()
    self.gn_conv_last = nn.Conv2d(features, num_classes, (1, 1), bias=False)


class OfficialDCG(nn.Module):
  """pretraining/dcg.py's DCG: same registration order and names, tiny trunks."""

  def __init__(self, global_net, local_net, features, num_classes, attn_dim, cam=4, crop=8, k=6):
    super().__init__()
    self.ds_net = OfficialTrunk(global_net, keep_avgpool=False)
    self.left_postprocess_net = PostProcessing(features, num_classes)
    self.dn_resnet = OfficialTrunk(local_net, keep_avgpool=False)
    self.mil_attn_V = nn.Linear(features, attn_dim, bias=False)
    self.mil_attn_U = nn.Linear(features, attn_dim, bias=False)
    self.mil_attn_w = nn.Linear(attn_dim, 1, bias=False)
    self.classifier_linear = nn.Linear(features, num_classes, bias=False)
    self.cam, self.crop, self.k = cam, crop, k

  def forward(self, x):
    s = self.left_postprocess_net.gn_conv_last(self.ds_net.f(x))  # [B, C, h, w]
    b, c, h, w = s.shape
    y_global = s.view(b, c, -1).mean(dim=2)
    flat = s.view(b, c, -1)
    lo, hi = flat.min(2, keepdim=True)[0], flat.max(2, keepdim=True)[0]
    a = ((flat - lo) / (hi - lo)).sum(1)  # [B, h*w]
    crops = []
    for i in range(b):
      cur = a[i].clone()
      for _ in range(self.k):
        idx = int(torch.argmax(cur))
        r, col = idx // w, idx % w
        cur[idx] = 0
        pr, pc = round(r / h * x.shape[2]), round(col / w * x.shape[3])
        crops.append(x[i, 0, pr:pr + self.crop, pc:pc + self.crop])
    crops = torch.stack(crops).unsqueeze(1).expand(-1, 3, -1, -1)
    h_crops = self.dn_resnet.f(crops).mean(dim=(2, 3)).view(b, self.k, -1)
    hc = h_crops.reshape(b * self.k, -1)
    score = self.mil_attn_w(torch.sigmoid(self.mil_attn_U(hc)) * torch.tanh(self.mil_attn_V(hc)))
    attn = F.softmax(score.view(b, self.k), dim=1)
    y_local = self.classifier_linear((attn.unsqueeze(-1) * h_crops).sum(1))
    return 0.5 * (y_global + y_local), y_global, y_local


def official_models(cfg, seed=0):
  c, f = cfg.data.num_classes, cfg.model.feature_dim
  enc = TorchResNet(BasicBlock, cfg.model.encoder_stage_sizes, cfg.model.encoder_width)
  model = randomize_(ConditionalModel(enc, c, f, cfg.diffusion.timesteps + 1).eval(), seed)
  trunk = lambda: TorchResNet(Bottleneck, cfg.guidance.stage_sizes, cfg.guidance.width)
  features = cfg.guidance.width * 2 ** (len(cfg.guidance.stage_sizes) - 1) * 4
  dcg = randomize_(OfficialDCG(trunk(), trunk(), features, c, cfg.guidance.attention_dim).eval(),
                   seed + 1)
  return model, dcg


def _official_files(tmp_path, model, dcg, ema=None, step=123):
  opt = torch.optim.Adam(model.parameters(), lr=1e-3)
  aux_opt = torch.optim.Adam(dcg.parameters(), lr=2e-4, amsgrad=True)
  states = [model.state_dict(), opt.state_dict(), 7, step]
  if ema is not None:
    states.append(ema)
  ckpt = save_pth(states, tmp_path / "ckpt.pth")
  aux = save_pth([dcg.state_dict(), aux_opt.state_dict()], tmp_path / "aux_ckpt.pth")
  return ckpt, aux


def _abstract_state(cfg):
  """The abstract TrainState that `--mode eval` restores into."""
  from diffmic_jax.run import train_state  # pylint: disable=g-import-not-at-top
  models = models_lib.create_models(cfg)
  return models, train_state.abstract_train_state(models, cfg)


def _restore(cfg, workdir, kind="best"):
  """Restores as `--mode eval` does: a fresh Checkpointer, strictly into the abstract state."""
  from diffmic_jax.run import checkpointing  # pylint: disable=g-import-not-at-top
  models, abstract = _abstract_state(cfg)
  checkpointer = checkpointing.Checkpointer(str(workdir))
  state, meta = checkpointer.restore(kind, None, abstract)
  checkpointer.close()
  return models, state, meta


@pytest.fixture(scope="module")
def official_workdir(tmp_path_factory):
  """Official-format files of a tiny model, converted once: (config, torch models, workdir)."""
  tmp_path = tmp_path_factory.mktemp("official")
  cfg = tiny_config()
  model, dcg = official_models(cfg)
  ckpt, aux = _official_files(tmp_path, model, dcg)
  convert.convert_official(cfg, ckpt, aux, str(tmp_path / "work"))
  return cfg, model, dcg, tmp_path / "work"


def test_official_checkpoint_converts_and_matches_torch(official_workdir):
  cfg, model, dcg, workdir = official_workdir
  models, state, meta = _restore(cfg, workdir, "best")
  assert meta == {"data_iter": None, "stage": "joint", "best_accuracy": -1.0, "best_step": 123,
                  "source": "official"}
  assert int(state.step) == 123
  _, latest, _ = _restore(cfg, workdir, "latest")
  assert int(latest.step) == 123

  gen = torch.Generator().manual_seed(1)
  b, c = 4, cfg.data.num_classes
  x = torch.randn(b, 3, 32, 32, generator=gen)
  y_t = torch.randn(b, c, generator=gen)
  yhat = torch.softmax(torch.randn(b, c, generator=gen), -1)
  t = torch.tensor([0, 3, 9, 5])
  with torch.no_grad():
    ref_eps = model(x, y_t, t, yhat).numpy()
    ref_fused, ref_global, ref_local = (v.numpy() for v in dcg(x))
  x_nhwc = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
  eps = jax.jit(lambda v, *a: models.denoiser.apply(v, *a, train=False))(
      state.denoiser, x_nhwc, jnp.asarray(y_t.numpy()), jnp.asarray(yhat.numpy()),
      jnp.asarray(t.numpy()))
  np.testing.assert_allclose(np.asarray(eps), ref_eps, atol=1e-4, rtol=1e-4)
  logits, _ = jax.jit(lambda v, x: models.guidance.apply(v, x, train=False))(state.guidance, x_nhwc)
  np.testing.assert_allclose(np.asarray(logits["global"]), ref_global, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(logits["local"]), ref_local, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(logits["fused"]), ref_fused, atol=1e-4, rtol=1e-4)
  # No EMA shadow in the file: the EMA starts as the converted params.
  for a, e in zip(jax.tree.leaves(state.ema), jax.tree.leaves(state.denoiser["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def test_official_ema_shadow(tmp_path):
  cfg = tiny_config()
  model, dcg = official_models(cfg)
  shadow = {n: p.detach() + 1.0 for n, p in model.named_parameters()}
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  state = convert.build_official_state(cfg, sd, dcg.state_dict(), ema_shadow=shadow)
  np.testing.assert_allclose(np.asarray(state.ema["lin1"]["embed"]["embedding"]),
                             sd["lin1.embed.weight"] + 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(state.denoiser["params"]["lin1"]["embed"]["embedding"]),
                             sd["lin1.embed.weight"], rtol=1e-6)
  used = convert.build_official_state(cfg, sd, dcg.state_dict(), ema_shadow=shadow, use_ema=True)
  np.testing.assert_allclose(np.asarray(used.denoiser["params"]["lin4"]["dense"]["kernel"]),
                             sd["lin4.weight"].T + 1.0, rtol=1e-6)
  # BatchNorm statistics are not in the shadow and stay the raw ones.
  np.testing.assert_allclose(np.asarray(used.denoiser["batch_stats"]["norm1"]["var"]),
                             sd["unetnorm1.running_var"], rtol=1e-6)
  with pytest.raises(ValueError, match="no EMA shadow"):
    convert.build_official_state(cfg, sd, dcg.state_dict(), use_ema=True)


def test_official_errors_are_named(tmp_path):
  cfg = tiny_config()
  model, dcg = official_models(cfg)
  sd = dict(model.state_dict())
  dsd = dict(dcg.state_dict())
  with pytest.raises(pretrained.WeightMismatchError, match=r"missing tensor 'lin2\.embed\.weight'"):
    convert.build_official_state(
        cfg, {k: v for k, v in sd.items() if k != "lin2.embed.weight"}, dsd)
  with pytest.raises(pretrained.WeightMismatchError,
                     match=r"unexpected tensor.*'fusion_dnn\.weight'"):
    convert.build_official_state(cfg, sd, {**dsd, "fusion_dnn.weight": torch.zeros(3, 4)})
  cfg.diffusion.timesteps = 20  # embed tables would need 21 rows.
  with pytest.raises(pretrained.WeightMismatchError,
                     match=r"(?s)'lin1\.embed\.weight' has shape \(11, 16\).*diffusion\.timesteps"):
    convert.build_official_state(cfg, sd, dsd)
  cfg = tiny_config()
  cfg.ablation = "basic"
  with pytest.raises(ValueError, match="ablation='basic'"):
    convert.build_official_state(cfg, sd, dsd)


def test_official_files_load_with_weights_only(tmp_path):
  cfg = tiny_config()
  model, dcg = official_models(cfg)
  ema = {n: p.detach().clone() for n, p in model.named_parameters()}
  ckpt, aux = _official_files(tmp_path, model, dcg, ema=ema, step=5)
  sd, step, shadow = convert.parse_denoiser_checkpoint(convert.load_official_file(ckpt), ckpt)
  assert step == 5 and shadow is not None and set(shadow) == set(ema)
  aux_sd = convert.parse_aux_checkpoint(convert.load_official_file(aux), aux)
  assert set(aux_sd) == set(dcg.state_dict())


def _lightning(module, step):
  """A PyTorch Lightning-style checkpoint of `module`: its state_dict beside the trainer's keys."""
  return {"state_dict": module.state_dict(), "epoch": 1, "global_step": step,
          "optimizer_states": [{}], "lr_schedulers": [], "pytorch-lightning_version": "2.0.0"}


def test_lightning_checkpoints_convert_like_the_official_files(tmp_path):
  """A Lightning .ckpt whose 'state_dict' holds the official model's tensors gives the state the
  official list gives (its global_step the step); one of the other model is refused by name."""
  cfg = tiny_config()
  model, dcg = official_models(cfg)
  ckpt, aux = _official_files(tmp_path, model, dcg, step=9)
  l_ckpt = save_pth(_lightning(model, 9), tmp_path / "model.ckpt")
  l_aux = save_pth(_lightning(dcg, 9), tmp_path / "dcg.ckpt")
  sd, step, shadow = convert.parse_denoiser_checkpoint(convert.load_official_file(l_ckpt), l_ckpt)
  aux_sd = convert.parse_aux_checkpoint(convert.load_official_file(l_aux), l_aux)
  assert step == 9 and shadow is None
  ref_sd, _, _ = convert.parse_denoiser_checkpoint(convert.load_official_file(ckpt), ckpt)
  ref_aux = convert.parse_aux_checkpoint(convert.load_official_file(aux), aux)
  state = convert.build_official_state(cfg, sd, aux_sd, step=step)
  reference = convert.build_official_state(cfg, ref_sd, ref_aux, step=9)
  assert int(state.step) == 9
  for ours, ref in zip(jax.tree.leaves(state), jax.tree.leaves(reference), strict=True):
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
  # The files swapped: each names its file and the model it should hold.
  with pytest.raises(ValueError, match=r"dcg.ckpt: the state_dict holds no tensor of the "
                                       r"official ConditionalModel \(encoder_x\.\*"):
    convert.parse_denoiser_checkpoint(convert.load_official_file(l_aux), l_aux)
  with pytest.raises(ValueError, match=r"model.ckpt: the state_dict holds no tensor of the "
                                       r"official DCG \(ds_net\.\*.*expected the official "
                                       r"aux_ckpt"):
    convert.parse_aux_checkpoint(convert.load_official_file(l_ckpt), l_ckpt)


def test_torchvision_lightning_ckpt_reads_its_state_dict(tmp_path):
  """A Lightning .ckpt of a torchvision ResNet (the state_dict under 'state_dict') converts like
  the .pth of the same weights."""
  net = tiny_torch_resnet("basic", (1, 1), 8, seed=3)
  pth = save_pth(net.state_dict(), tmp_path / "r.pth")
  ckpt = save_pth(_lightning(net, 4), tmp_path / "r.ckpt")
  ours, ref = pretrained.load_trunk(ckpt), pretrained.load_trunk(pth)
  assert ours[1] == ref[1] and ours[0].keys() == ref[0].keys()
  for key in ref[0]:
    np.testing.assert_array_equal(ours[0][key], ref[0][key])
