"""Pretrained ResNet trunks: torchvision state_dicts -> our variables, strictly.

The paper's DCG uses two ImageNet-pretrained torchvision ResNet-50 trunks (REFERENCE.md §2,
§13). Nothing is downloaded here: `python -m diffmic_jax.convert torchvision` turns a
torchvision state_dict (.pth, .safetensors or .npz) into a trunk `.npz`, and
`load_configured` puts such a file into the trunks named by the config.

A trunk `.npz` holds flat keys `params/<module path>/<leaf>` and `batch_stats/...` in our
layout (conv kernels HWIO, BatchNorm scale/bias and mean/var) plus `__meta__/*` entries that
describe the architecture. `load_configured` also accepts a raw torchvision state_dict file
(keys `conv1.weight`, `layer1.0.bn1.running_var`, ...) and converts it on the fly.

Layout conversions (PyTorch -> ours): conv weight OIHW -> HWIO; Linear weight [out, in] ->
kernel [in, out]; BatchNorm weight/bias/running_mean/running_var -> scale/bias/mean/var.
PyTorch's running_var is the unbiased estimate, which is what our BatchNorm stores by default
(`model.bn_running_var='unbiased'`), and evaluation normalises with the stored value either way,
so it is copied unchanged. `num_batches_tracked` is dropped (PyTorch's momentum 0.1 is our
fixed Flax-convention momentum 0.9 and needs no counter).

Loading is strict: every tensor of the file must be used (torchvision's `fc.*` classifier is
the only explicit exception, our trunks have none), every variable of the trunk must be
present, and shapes must agree; the error names the file and the first mismatch.
"""

import os
import pickle
import re
import zipfile
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffmic_jax.nn import resnet
from diffmic_jax.platform import errors
from diffmic_jax.platform import trees

SEP = "/"
META = "__meta__"
COLLECTIONS = ("params", "batch_stats")
# Torch buffers with no counterpart in our BatchNorm.
IGNORED_SUFFIXES = (".num_batches_tracked",)
# torchvision's ImageNet classifier; our trunks end before avgpool/fc.
TORCHVISION_IGNORED = ("fc.weight", "fc.bias")
_BN_LEAVES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
TORCH_INSTALL_HINT = "pip install torch==2.13.0"


class WeightMismatchError(ValueError):
  """A weight file does not match the model: missing, unexpected or mis-shaped tensors."""


class TrunkSignature(NamedTuple):
  """What identifies a ResNet trunk's variables: block kind, blocks per stage, stem width."""

  block: str
  stage_sizes: tuple
  width: int

  def describe(self) -> str:
    names = [n for n, (stages, block) in resnet.ARCHITECTURES.items()
             if tuple(stages) == self.stage_sizes and block == self.block]
    name = names[0] if names and self.width == 64 else "custom"
    return (f"{name} ({self.block} blocks, stages {self.stage_sizes}, width {self.width})")


# ---------------------------------------------------------------------------------------------
# Pytree helpers.


def flatten(tree: Mapping) -> dict:
  """{'a': {'b': x}} -> {'a/b': x} (dicts only; `trees.flatten_dicts`)."""
  return trees.flatten_dicts(tree, SEP)


def unflatten(flat: Mapping) -> dict:
  """Inverse of `flatten`."""
  return trees.unflatten(flat, SEP)


def _to_dict(tree):
  """A mutable nested-dict copy (FrozenDicts included); leaves are shared."""
  if isinstance(tree, Mapping):
    return {k: _to_dict(v) for k, v in tree.items()}
  return tree


# ---------------------------------------------------------------------------------------------
# Name mapping: our variable paths -> PyTorch state_dict keys.


def torch_leaf_name(leaf: str, ndim: int) -> tuple[str, str]:
  """Our leaf name -> (torch parameter name, layout transform).

  Transforms: 'conv' (OIHW -> HWIO), 'linear' ([out, in] -> [in, out]), 'copy'.
  """
  if leaf == "kernel":
    return "weight", ("conv" if ndim == 4 else "linear")
  if leaf == "embedding":
    return "weight", "copy"
  if leaf in _BN_LEAVES:
    return _BN_LEAVES[leaf], "copy"
  raise KeyError(f"no PyTorch name for the variable leaf {leaf!r}")


_BLOCK = re.compile(r"^layer(\d+)_(\d+)$")
_BLOCK_PARTS = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}


def trunk_module_name(path: Sequence[str], style: str = "torchvision") -> str:
  """Our ResNet module path -> the torch module name.

  Args:
    path: e.g. ('conv1',), ('layer2_0', 'downsample_bn').
    style: 'torchvision' (`conv1`, `bn1`, `layer2.0.downsample.1`) or 'sequential' (the
      official DiffMIC wrappers keep torchvision's children in an nn.Sequential `f`:
      conv1 -> f.0, bn1 -> f.1, layer{k} -> f.{3+k}; the prefix `f.` is the caller's).
  """
  styles = {"torchvision": {"conv1": "conv1", "bn1": "bn1"},
            "sequential": {"conv1": "0", "bn1": "1"}}
  if style not in styles:
    raise ValueError(f"unknown trunk naming style {style!r}; choose from {sorted(styles)}")
  head, rest = path[0], list(path[1:])
  if head in styles[style]:
    if rest:
      raise KeyError(f"unexpected trunk variable path {SEP.join(path)}")
    return styles[style][head]
  match = _BLOCK.match(head)
  if not match or len(rest) != 1:
    raise KeyError(f"unexpected trunk variable path {SEP.join(path)}")
  stage, block = int(match.group(1)), int(match.group(2))
  stage_name = f"layer{stage}" if style == "torchvision" else str(3 + stage)
  return f"{stage_name}.{block}.{_BLOCK_PARTS.get(rest[0], rest[0])}"


def to_ours(value: np.ndarray, transform: str) -> np.ndarray:
  """Applies a layout transform of `torch_leaf_name` to a PyTorch array."""
  value = np.asarray(value)
  if transform == "conv":
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
  if transform == "linear":
    return value.T if value.ndim == 2 else value
  return value


def map_state_dict(state_dict: Mapping[str, np.ndarray], expected: Mapping[str, Any],
                   module_name: Callable[[Sequence[str]], str], *, source: str,
                   prefix: str = "", ignore: Iterable[str] = ()) -> dict:
  """Strictly maps a PyTorch state_dict onto our flat variables.

  Args:
    state_dict: torch key -> array (numpy; torch tensors converted by the caller).
    expected: flat key `collection/module path.../leaf` -> anything with `.shape` (our
      variables or their `jax.ShapeDtypeStruct`s); the collection is 'params' or
      'batch_stats'.
    module_name: our module path (without collection and leaf) -> torch module name.
    source: the file name, for error messages.
    prefix: prepended to every torch key (e.g. 'encoder_x.').
    ignore: torch keys the model deliberately leaves unused.

  Returns:
    flat key -> float32 numpy array in our layout, for every key of `expected`.

  Raises:
    WeightMismatchError: naming the first missing, unexpected or mis-shaped tensor.
  """
  ignore = set(ignore)
  out, used = {}, set()
  for key, want in expected.items():
    collection, *path, leaf = key.split(SEP)
    if collection not in COLLECTIONS:
      raise KeyError(f"unexpected variable collection in {key}")
    want_shape = tuple(want.shape)
    torch_leaf, transform = torch_leaf_name(leaf, len(want_shape))
    torch_key = f"{prefix}{module_name(path)}.{torch_leaf}"
    if torch_key not in state_dict:
      raise WeightMismatchError(
          f"{source}: missing tensor {torch_key!r} (for our {key}, shape {want_shape}); "
          f"the file has {len(state_dict)} tensors, e.g. {sorted(state_dict)[:3]}")
    value = to_ours(state_dict[torch_key], transform)
    if tuple(value.shape) != want_shape:
      raise WeightMismatchError(
          f"{source}: tensor {torch_key!r} has shape {tuple(np.shape(state_dict[torch_key]))} "
          f"(-> {tuple(value.shape)} in our layout) but our {key} has shape {want_shape}")
    out[key] = np.asarray(value, np.float32)
    used.add(torch_key)
  unused = [k for k in state_dict
            if k not in used and k not in ignore and not k.endswith(IGNORED_SUFFIXES)]
  if unused:
    listing = ", ".join(unused[:8]) + ("..." if len(unused) > 8 else "")
    raise WeightMismatchError(
        f"{source}: {len(unused)} unexpected tensor(s) the model has no place for, first "
        f"{unused[0]!r} shape {tuple(np.shape(state_dict[unused[0]]))} (all: {listing})")
  return out


# ---------------------------------------------------------------------------------------------
# Trunk signatures and abstract trunks.

_TORCH_BLOCK = re.compile(r"^layer(\d+)\.(\d+)\.")
_OUR_BLOCK = re.compile(r"^(?:params|batch_stats)/layer(\d+)_(\d+)/")


def _signature(keys: Iterable[str], pattern, conv3_marker: str, width: int) -> TrunkSignature:
  blocks, bottleneck = {}, False
  for key in keys:
    match = pattern.match(key)
    if match:
      stage, block = int(match.group(1)), int(match.group(2))
      blocks[stage] = max(blocks.get(stage, 0), block + 1)
      bottleneck |= conv3_marker in key
  stages = tuple(blocks.get(s, 0) for s in range(1, max(blocks, default=0) + 1))
  return TrunkSignature("bottleneck" if bottleneck else "basic", stages, int(width))


def torch_trunk_signature(state_dict: Mapping[str, np.ndarray], source: str) -> TrunkSignature:
  """Infers block kind, stage sizes and width of a torchvision ResNet state_dict."""
  if "conv1.weight" not in state_dict:
    raise WeightMismatchError(
        f"{source}: no 'conv1.weight'; expected a torchvision ResNet state_dict (first keys: "
        f"{list(state_dict)[:5]})")
  return _signature(state_dict, _TORCH_BLOCK, ".conv3.", np.shape(state_dict["conv1.weight"])[0])


def trunk_signature(flat: Mapping[str, Any]) -> TrunkSignature:
  """The signature of our flat trunk variables (`params/conv1/kernel`, ...)."""
  return _signature(flat, _OUR_BLOCK, "/conv3/", flat["params/conv1/kernel"].shape[-1])


def abstract_trunk(signature: TrunkSignature) -> dict:
  """Flat {key: ShapeDtypeStruct} of a `resnet.ResNet` trunk with this signature."""
  model = resnet.ResNet(stage_sizes=tuple(signature.stage_sizes), block=signature.block,
                        width=signature.width)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(lambda k, x: model.init(k, x, train=False),
                             jax.random.PRNGKey(0), x)
  return flatten({c: variables[c] for c in COLLECTIONS})


def architecture_signature(arch: str, stage_sizes: Sequence[int] = (),
                           width: int = 64) -> TrunkSignature:
  """TrunkSignature of a named torchvision architecture (optionally custom depth/width)."""
  kwargs = resnet.resnet_kwargs(arch, stage_sizes)
  return TrunkSignature(kwargs["block"], tuple(kwargs["stage_sizes"]), int(width))


# ---------------------------------------------------------------------------------------------
# Reading files.


def require_torch():
  """Imports torch or raises an ImportError saying how to install it."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"reading .pth files needs PyTorch (CPU is enough): {TORCH_INSTALL_HINT}, "
                      "or convert the file to .safetensors/.npz elsewhere") from e
  return torch


def torch_to_numpy(value):
  """A torch tensor (any dtype) -> numpy float32/int array; other values unchanged."""
  if hasattr(value, "detach") and hasattr(value, "numpy"):
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    return value.numpy()
  return value


def read_state_dict(path: str) -> dict:
  """Reads a torchvision-style state_dict from .pth/.pt/.ckpt, .safetensors or .npz.

  .pth needs torch and is read with `weights_only=True` (plain tensors only; torchvision's
  published weights load this way). A dict holding the state_dict under 'state_dict' or
  'model' is unwrapped (a PyTorch Lightning .ckpt holds it under 'state_dict').
  """
  readers = {".pth": _read_pth, ".pt": _read_pth, ".bin": _read_pth, ".ckpt": _read_pth,
             ".safetensors": _read_safetensors, ".npz": _read_npz}
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file; expected a torchvision state_dict "
                            f"({', '.join(sorted(readers))})")
  ext = os.path.splitext(path)[1].lower()
  if ext not in readers:
    raise ValueError(f"{path}: unknown weight file extension {ext!r}; choose from "
                     f"{sorted(readers)}")
  return readers[ext](path)


# A legacy (pre-1.6) torch.save file is a series of pickles, the first being this number.
_LEGACY_TORCH_MAGIC = b"\x8a\x0a" + (0x1950a86a20f9469cfc6c).to_bytes(10, "little")


def check_torch_file(path: str) -> None:
  """Raises naming the file unless it looks like a complete torch.save file: a zip archive
  holding a `data.pkl` whose entries pass their CRC, or a legacy (pre-1.6) pickle series that
  starts with torch's magic number. torch's own errors for a truncated or foreign file (a
  NumPy .npz, a plain pickle) are bare tracebacks or blame unsupported pickle opcodes."""
  expected = "expected a file written by torch.save"
  with open(path, "rb") as f:
    head = f.read(32)
  if head[:2] == b"PK":
    try:
      with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
      raise errors.UserError(f"{path}: truncated or damaged PyTorch checkpoint ({e}); {expected} "
                             "(download it again)") from e
    if not any(name.endswith("data.pkl") for name in names):
      held = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
      raise errors.UserError(f"{path}: a zip archive without the data.pkl of a PyTorch "
                             f"checkpoint (holds {held}; a NumPy .npz?); {expected}")
    if bad is not None:
      raise errors.UserError(f"{path}: damaged PyTorch checkpoint (entry {bad} fails its CRC); "
                             "download it again")
  elif _LEGACY_TORCH_MAGIC not in head:
    kind = "a Python pickle" if head[:1] == b"\x80" else f"starts with {head[:2]!r}"
    raise errors.UserError(f"{path}: not a PyTorch checkpoint ({kind}); {expected}")


def _read_pth(path):
  check_torch_file(path)
  torch = require_torch()
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
    raise errors.UserError(f"{path}: not a readable PyTorch weight file ({e})") from e
  for wrapper in ("state_dict", "model"):
    if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
      obj = obj[wrapper]
  if not isinstance(obj, Mapping):
    raise WeightMismatchError(f"{path}: expected a state_dict (a dict of tensors), got "
                              f"{type(obj).__name__}")
  return {str(k): torch_to_numpy(v) for k, v in obj.items()}


def _read_safetensors(path):
  try:
    from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("reading .safetensors needs `pip install safetensors`") from e
  return dict(st_numpy.load_file(path))


def _read_npz(path):
  with np.load(path, allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


def save_trunk(path: str, flat: Mapping[str, np.ndarray], signature: TrunkSignature,
               source: str = "") -> None:
  """Writes a converted trunk `.npz` (our flat layout plus `__meta__/*`)."""
  arrays = {k: np.asarray(v, np.float32) for k, v in flat.items()}
  arrays[f"{META}/block"] = np.asarray(signature.block)
  arrays[f"{META}/stage_sizes"] = np.asarray(signature.stage_sizes, np.int32)
  arrays[f"{META}/width"] = np.asarray(signature.width, np.int32)
  arrays[f"{META}/source"] = np.asarray(os.path.basename(source))
  arrays[f"{META}/format"] = np.asarray("diffmic_jax.trunk.v1")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    np.savez(f, **arrays)


def convert_torchvision(state_dict: Mapping[str, np.ndarray], arch: Optional[str] = None,
                        stage_sizes: Sequence[int] = (), width: int = 64,
                        source: str = "state_dict") -> tuple[dict, TrunkSignature]:
  """Converts a torchvision ResNet state_dict to our flat trunk variables, strictly.

  Args:
    state_dict: torchvision keys (`conv1.weight`, `layer1.0.bn1.running_var`, `fc.weight`,
      ...) -> numpy arrays.
    arch: 'resnet18' | 'resnet34' | 'resnet50' the file must be, or None to accept what the
      file holds.
    stage_sizes, width: a non-standard depth / stem width for `arch` (tests use tiny ones).
    source: the file name, for errors.

  Returns:
    (flat {'params/...' | 'batch_stats/...': float32 array in our layout}, signature).

  Raises:
    WeightMismatchError: another architecture, missing/unexpected tensors or wrong shapes.
  """
  found = torch_trunk_signature(state_dict, source)
  if arch is not None:
    want = architecture_signature(arch, stage_sizes, width)
    if found != want:
      raise WeightMismatchError(f"{source} holds a {found.describe()} trunk, not the requested "
                                f"{arch}: {want.describe()}")
  expected = abstract_trunk(found)
  flat = map_state_dict(state_dict, expected, trunk_module_name, source=source,
                        ignore=TORCHVISION_IGNORED)
  return flat, found


def load_trunk(path: str) -> tuple[dict, TrunkSignature]:
  """Reads a trunk: a converted `.npz`, or a raw torchvision state_dict (converted on the fly).

  Returns:
    (flat our-layout arrays, signature).
  """
  raw = read_state_dict(path)
  if f"{META}/format" not in raw:
    return convert_torchvision(raw, source=path)
  flat = {k: v for k, v in raw.items() if not k.startswith(META + SEP)}
  bad = [k for k in flat if k.split(SEP)[0] not in COLLECTIONS]
  if bad:
    raise WeightMismatchError(f"{path}: unexpected entry {bad[0]!r} in a converted trunk file")
  return flat, trunk_signature(flat)


# ---------------------------------------------------------------------------------------------
# Putting trunks into model variables.


def first_mismatch(source: Mapping[str, Any], target: Mapping[str, Any]) -> Optional[str]:
  """The first parameter (sorted by name) where two flat trees differ, with both shapes.

  Args:
    source, target: flat {'params/<path>/<leaf>': array-like} trees.

  Returns:
    None when both have the same keys and shapes, else e.g.
    "params/conv1/kernel: source (7, 7, 3, 64), target (7, 7, 3, 16)", with 'absent' for
    a key that only one side has.
  """
  for key in sorted(set(source) | set(target)):
    shapes = [tuple(np.shape(side[key])) if key in side else None for side in (source, target)]
    if shapes[0] != shapes[1]:
      source_shape, target_shape = (s if s is not None else "absent" for s in shapes)
      return f"{key}: source {source_shape}, target {target_shape}"
  return None


def assign_trunk(variables: Mapping, trunk: str, flat: Mapping[str, np.ndarray],
                 signature: TrunkSignature, source: str, where: str) -> dict:
  """Replaces the trunk `trunk` of one model's {'params', 'batch_stats'} with `flat`, strictly.

  Args:
    variables: {'params': ..., 'batch_stats': ...} of one model (arrays or abstract values).
    trunk: the trunk's module name in that model ('global_net', 'encoder_net', ...).
    flat: the trunk's converted arrays (from `load_trunk`).
    signature: their signature, for a readable architecture error.
    source: the file, for errors.
    where: the model's name, for errors (e.g. 'guidance').

  Returns:
    a new variables dict with the trunk's leaves replaced (float32 jnp arrays).
  """
  variables = _to_dict(variables)
  current = flatten({c: variables[c].get(trunk, {}) for c in COLLECTIONS if c in variables})
  if not current:
    raise WeightMismatchError(f"{where} has no trunk named {trunk!r} to load {source} into")
  mismatch = first_mismatch(flat, current)
  target_signature = trunk_signature(current)
  if target_signature != signature:
    raise WeightMismatchError(
        f"{source} holds a {signature.describe()} trunk but {where}/{trunk} is a "
        f"{target_signature.describe()}; first mismatch: {mismatch} (check the config's "
        "backbone, width and stage sizes)")
  if mismatch:
    raise WeightMismatchError(f"{source} does not match {where}/{trunk}: {mismatch}")
  for key, value in flat.items():
    collection, *path = key.split(SEP)
    node = variables[collection][trunk]
    for name in path[:-1]:
      node = node[name]
    # A copy: one source trunk may feed two trunks (a classifier's into both DCG trunks), and
    # the train step donates every buffer of the state once.
    node[path[-1]] = jnp.array(value, getattr(node[path[-1]], "dtype", jnp.float32), copy=True)
  return variables


GUIDANCE_TRUNKS = ("global_net", "local_net", "net")


def load_configured(variables: Mapping, config) -> dict:
  """Loads the pretrained trunks named by the config into freshly initialised variables.

  `config.guidance.pretrained` goes into both DCG trunks (`global_net` and `local_net`, as
  the paper's ImageNet initialisation) or the ablations' classifier trunk (`net`);
  `config.model.encoder_pretrained` goes into ρ(x)'s trunk (`denoiser/encoder_net`). Each is
  a converted trunk `.npz` or a torchvision state_dict file.

  Args:
    variables: {'guidance': {'params', 'batch_stats'}, 'denoiser': {...}} from
      `models.init_variables` (concrete or abstract arrays).
    config: the experiment config.

  Returns:
    `variables` itself when nothing is configured, else an updated copy.

  Raises:
    WeightMismatchError: a file does not fit the configured trunk.
    FileNotFoundError, ImportError: unreadable file.
  """
  guidance_file = config.guidance.pretrained
  encoder_file = config.model.encoder_pretrained
  if not guidance_file and not encoder_file:
    return variables
  variables = _to_dict(variables)
  if guidance_file:
    flat, signature = load_trunk(guidance_file)
    names = [n for n in GUIDANCE_TRUNKS if n in variables["guidance"]["params"]]
    if not names:
      raise WeightMismatchError(f"config.guidance.pretrained={guidance_file}: the guidance model "
                                f"has none of the trunks {list(GUIDANCE_TRUNKS)}")
    for name in names:
      variables["guidance"] = assign_trunk(variables["guidance"], name, flat, signature,
                                           guidance_file, "guidance")
  if encoder_file:
    if "denoiser" not in variables:
      raise ValueError(f"config.model.encoder_pretrained={encoder_file} but ablation "
                       f"{config.ablation!r} has no denoiser")
    flat, signature = load_trunk(encoder_file)
    variables["denoiser"] = assign_trunk(variables["denoiser"], "encoder_net", flat, signature,
                                         encoder_file, "denoiser")
  return variables


# ---------------------------------------------------------------------------------------------
# Trunks from a trained run of ours (config.guidance.init_from, config.model.encoder_init_from).

# Where each guidance trunk takes its weights in a run of ours, in order of preference: a DCG
# trunk from the same DCG trunk, else from a classifier's trunk ('basic', 'c1'), and a
# classifier's trunk from a classifier's, else from a DCG's global trunk.
RUN_TRUNK_SOURCES = {"global_net": ("global_net", "net"), "local_net": ("local_net", "net"),
                     "net": ("net", "global_net")}
# Where ρ(x)'s trunk takes its weights: a run's own ρ(x), else its guidance model's image trunk.
ENCODER_TRUNK_SOURCES = (("denoiser", "encoder_net"), ("guidance", "net"),
                         ("guidance", "global_net"))


def module_tree(model_variables: Mapping, module: str) -> dict:
  """The flat {'params/...', 'batch_stats/...'} arrays of one top-level module of a model."""
  model_variables = _to_dict(model_variables)
  return flatten({c: model_variables[c][module] for c in COLLECTIONS
                  if module in model_variables.get(c, {})})


def _first_present(source: Mapping, candidates) -> Optional[tuple[str, str]]:
  for model, module in candidates:
    if module in source.get(model, {}).get("params", {}):
      return model, module
  return None


def guidance_from_run(variables: Mapping, source: Mapping, source_name: str
                      ) -> tuple[dict, list[str]]:
  """Initialises the guidance model from the guidance model of a trained run, trunks strictly.

  Every trunk of the target (`global_net` and `local_net` of a DCG, `net` of a classifier) is
  loaded from `RUN_TRUNK_SOURCES`' first trunk the source has (parameters and BatchNorm
  statistics); an architecture mismatch raises. The other modules (the heads: fc layers, the
  gated-attention MIL) are loaded leaf by leaf where the source has the same leaf with the
  same shape, and left at their initialisation otherwise (e.g. another number of classes).

  Args:
    variables: {'guidance': {'params', 'batch_stats'}, ...} freshly initialised.
    source: the source run's train state as nested dicts ({'guidance': ..., 'denoiser': ...}).
    source_name: the source checkpoint, for messages.

  Returns:
    (updated variables, log lines saying what was loaded from where and what was not).

  Raises:
    WeightMismatchError: the source has no guidance trunk, or a trunk's architecture differs.
  """
  variables = _to_dict(variables)
  guidance = variables["guidance"]
  notes = []
  trunks = [name for name in RUN_TRUNK_SOURCES if name in guidance["params"]]
  for name in trunks:
    found = _first_present(source, [("guidance", n) for n in RUN_TRUNK_SOURCES[name]])
    if found is None:
      raise WeightMismatchError(
          f"{source_name}: the source's guidance model has none of the trunks "
          f"{list(RUN_TRUNK_SOURCES[name])} to initialise guidance/{name} from")
    flat = module_tree(source[found[0]], found[1])
    guidance = assign_trunk(guidance, name, flat, trunk_signature(flat),
                            f"{source_name} ({found[0]}/{found[1]})", "guidance")
    notes.append(f"guidance/{name} <- {found[0]}/{found[1]} of {source_name}")
  heads = {k: v for k, v in flatten(guidance).items() if k.split(SEP)[1] not in trunks}
  source_guidance = flatten(_to_dict(source["guidance"]))
  loaded, skipped = {}, []
  for key, value in heads.items():
    if key in source_guidance and tuple(np.shape(source_guidance[key])) == tuple(value.shape):
      loaded[key] = jnp.array(source_guidance[key], value.dtype, copy=True)
    else:
      skipped.append(key)
  if loaded:
    notes.append(f"guidance heads <- {source_name}: {len(loaded)} of {len(heads)} tensors")
  if skipped:
    first = skipped[0]
    reason = first_mismatch({first: source_guidance[first]} if first in source_guidance else {},
                            {first: heads[first]})
    notes.append(f"guidance heads not loaded ({len(skipped)} tensors, left at their "
                 f"initialisation): the first, {reason}")
  variables["guidance"] = unflatten({**flatten(guidance), **loaded})
  return variables, notes


def encoder_from_run(variables: Mapping, source: Mapping, source_name: str
                     ) -> tuple[dict, list[str]]:
  """Initialises ρ(x)'s trunk (`denoiser/encoder_net`) from a trained run, strictly.

  The source trunk is the run's own ρ(x) when it has a denoiser, else its guidance model's
  image trunk (a classifier's `net` or a DCG's `global_net`): `ENCODER_TRUNK_SOURCES`.

  Args, Returns, Raises: as `guidance_from_run`, for the denoiser.
  """
  variables = _to_dict(variables)
  if "denoiser" not in variables:
    raise WeightMismatchError(f"{source_name}: this ablation has no ρ(x) to initialise")
  found = _first_present(source, ENCODER_TRUNK_SOURCES)
  if found is None:
    raise WeightMismatchError(f"{source_name}: the source has none of the trunks "
                              f"{[f'{m}/{n}' for m, n in ENCODER_TRUNK_SOURCES]}")
  flat = module_tree(source[found[0]], found[1])
  variables["denoiser"] = assign_trunk(variables["denoiser"], "encoder_net", flat,
                                       trunk_signature(flat),
                                       f"{source_name} ({found[0]}/{found[1]})", "denoiser")
  return variables, [f"denoiser/encoder_net <- {found[0]}/{found[1]} of {source_name}"]
