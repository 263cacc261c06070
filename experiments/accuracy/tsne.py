"""The paper's Fig. 2: t-SNE of the label vector y along the reverse chain, coloured by class.

Runs one reverse chain per example of a split (`sampler.sample_trajectory`, the config's test
sampler and steps, the --mode eval key per batch), keeps y_t at a few steps from the initial
noise μ + z to ŷ₀, embeds each set of C-dimensional vectors in 2-D with scikit-learn's t-SNE,
and draws one panel per step in one PNG.

  python experiments/accuracy/tsne.py --config configs/demo.py --workdir runs/demo \
      [--checkpoint best] [--split test] [--panels 6] [--max_examples 1000] \
      [--png runs/demo/eval/tsne.png]
"""

import functools
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

# Lets `python experiments/accuracy/tsne.py` import configs/ and diffmic_jax from the repo root.
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np
from sklearn import manifold

from diffmic_jax.data import input_pipeline
from diffmic_jax.data import splits as splits_lib
from diffmic_jax.diffusion import diffusion
from diffmic_jax.diffusion import sampler
from diffmic_jax.evaluation import evaluate
from diffmic_jax.nn import fast_conv
from diffmic_jax.run import run as run_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training workdir.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "'best', 'latest' or a step number.")
_SPLIT = flags.DEFINE_enum("split", "test", splits_lib.SPLIT_NAMES, "Split to embed.")
_PANELS = flags.DEFINE_integer("panels", 6, "Steps shown, from the noise to ŷ₀ (>= 2).")
_MAX = flags.DEFINE_integer("max_examples", 1000, "Use at most this many examples (t-SNE cost).")
_PNG = flags.DEFINE_string("png", None, "Output PNG (default WORKDIR/eval/tsne.png).")


def panel_indices(num_states: int, num_panels: int) -> list[int]:
  """Indices of `num_panels` states, evenly spaced from the first (noise) to the last."""
  return sorted(set(np.round(np.linspace(0, num_states - 1, num_panels)).astype(int).tolist()))


def trajectories(models, variables, batches, key, timesteps):
  """(states [N+1, M, C]: y at every timestep then ŷ₀, labels [M]) over the unpadded examples."""
  fn = jax.jit(functools.partial(sampler.sample_trajectory, models, timesteps=timesteps),
               compiler_options=fast_conv.compiler_options())
  states, labels = [], []
  for i, batch in enumerate(batches):
    out = jax.device_get(fn(variables, batch["image"], jax.random.fold_in(key, i)))
    mask = batch["mask"]
    states.append(np.concatenate([out["trajectory"], out["y0"][None]], axis=0)[:, mask])
    labels.append(batch["label"][mask])
  return np.concatenate(states, axis=1), np.concatenate(labels)


def embed(points: np.ndarray, seed: int = 0) -> np.ndarray:
  """[M, C] -> [M, 2] t-SNE (PCA initialisation, perplexity at most 30 and below M)."""
  perplexity = float(min(30.0, max(1.0, (len(points) - 1) / 3)))
  return manifold.TSNE(n_components=2, perplexity=perplexity, init="pca",
                       random_state=seed).fit_transform(points.astype(np.float64))


def save_png(embeddings, labels, titles, class_names, path: str) -> None:
  """One scatter panel per step, points coloured by true class."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(embeddings), figsize=(3.2 * len(embeddings), 3.6),
                           squeeze=False)
  colours = plt.get_cmap("tab10")
  for ax, points, title in zip(axes[0], embeddings, titles):
    for c, name in enumerate(class_names):
      chosen = labels == c
      ax.scatter(points[chosen, 0], points[chosen, 1], s=6, color=colours(c % 10), label=name)
    ax.set(xticks=[], yticks=[], title=title)
  axes[0, -1].legend(fontsize=7, markerscale=2, loc="best")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv) -> None:
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
  config, workdir = _CONFIG.value, _WORKDIR.value
  if _PANELS.value < 2:
    raise app.UsageError("--panels must be at least 2 (the noise and ŷ₀)")
  models, variables = evaluate.load_variables(config, workdir, _CHECKPOINT.value)
  splits = input_pipeline.create_splits(config.data, workdir)  # checks split.json
  d = config.diffusion
  timesteps = diffusion.timestep_sequence(d.sampler, d.timesteps, d.test_steps)
  source = getattr(splits, _SPLIT.value)
  if len(source) > _MAX.value:  # a fixed, class-mixed subset: the first M in split order
    source = input_pipeline.SubsetSource(source, np.arange(_MAX.value),
                                         np.asarray(source.labels)[:_MAX.value],
                                         list(source.ids)[:_MAX.value])
  batches = input_pipeline.eval_batches(source, config.data,
                                        batch_size=config.training.eval_batch_size)
  states, labels = trajectories(models, variables, batches, run_lib.eval_key(config), timesteps)
  chosen = panel_indices(len(states), _PANELS.value)
  names = [f"t = {timesteps[i]}" + (" (μ + z)" if i == 0 else "") for i in chosen[:-1]]
  titles = names + ["ŷ₀"] if chosen[-1] == len(states) - 1 else names
  embeddings = [embed(states[i], config.seed) for i in chosen]
  path = _PNG.value or os.path.join(workdir, "eval", "tsne.png")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  save_png(embeddings, labels, titles, splits.class_names, path)
  print(f"wrote {path}: {len(labels)} examples, panels {titles}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
