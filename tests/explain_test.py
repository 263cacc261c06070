"""Explanations: the overlay's ROI boxes sit on the ROIs the DCG chose from a saliency map with
known maxima; eval-mode example selection puts the confidently wrong first."""

import jax.numpy as jnp
import numpy as np

from diffmic_jax.evaluation import explain
from diffmic_jax.nn import dcg

# Six known maxima of a 4×4 saliency grid (class 1), strongest first; everything else is 0.
MAXIMA = [(2, 1), (0, 3), (3, 3), (1, 0), (0, 0), (2, 2)]


def test_overlay_boxes_are_at_the_rois_the_dcg_returned():
  saliency = np.zeros((1, 4, 4, 2), np.float32)
  for rank, (r, c) in enumerate(MAXIMA):
    saliency[0, r, c, 1] = 10.0 - rank
  saliency[0, :, :, 0] = 1.0  # a flat class map contributes nothing
  attention_map = dcg.normalize_saliency(jnp.asarray(saliency))[0]
  positions = np.asarray(dcg.select_rois(attention_map, 6, (1, 1)))
  assert [tuple(p) for p in positions] == MAXIMA
  image = np.zeros((32, 32, 3), np.uint8)
  attention = np.array([0.3, 0.25, 0.2, 0.1, 0.1, 0.05])
  fig = explain.overlay_figure(image, saliency[0], positions, attention, class_index=1,
                               crop_size=8, title="t")
  boxes = [(p.get_x(), p.get_y(), p.get_width(), p.get_height()) for p in fig.axes[1].patches]
  # 8-pixel cells: the box of cell (row, col) starts at pixel (x, y) = (8·col, 8·row).
  assert boxes == [(8 * c, 8 * r, 8, 8) for r, c in MAXIMA]
  labels = [t.get_text() for t in fig.axes[1].texts]
  assert labels == ["1: 0.30", "2: 0.25", "3: 0.20", "4: 0.10", "5: 0.10", "6: 0.05"]


def test_boxes_follow_the_crop_rounding_and_stay_inside_the_image():
  # 7×7 grid on 50 px: cells of 50/7 px; the crop's corner is round(cell · 50/7), clamped.
  boxes = explain.roi_boxes(np.array([[1, 2], [6, 6]]), (7, 7), (50, 50), crop_size=10)
  np.testing.assert_array_equal(boxes, [[14, 7, 10, 10], [40, 40, 10, 10]])


def test_class_map_is_min_max_scaled():
  cam = np.zeros((2, 2, 2))
  cam[..., 0] = [[1.0, 3.0], [5.0, 3.0]]
  np.testing.assert_allclose(explain.class_map(cam, 0), [[0.0, 0.5], [1.0, 0.5]])
  np.testing.assert_array_equal(explain.class_map(cam, 1), np.zeros((2, 2)))


def test_select_examples_puts_the_most_confidently_wrong_first():
  labels = np.array([0, 1, 2, 0, 1, 2])
  probs = np.eye(3)[[0, 2, 2, 1, 1, 0]]  # wrong: 1, 3, 5
  votes = probs * np.array([1.0, 0.6, 1.0, 0.9, 1.0, 0.7])[:, None]
  chosen = explain.select_examples({"probs": probs, "vote_probs": votes,
                                    "prediction": probs.argmax(1)}, labels, 4)
  assert chosen == [3, 5, 0, 1]
