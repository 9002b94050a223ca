"""bigvl/plots.py: what each figure shows is what it was given."""

import io

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import confusion_matrix as sk_confusion

from bigvl import plots


def _rows():
  return [
      {"step": 10, "loss": 4.0, "lr": 0.1, "grad_norm": 2.0},
      {"step": 20, "loss": 3.0, "lr": 0.2, "grad_norm": 1.0},
      {"step": 20, "zeroshot/accuracy": 0.3, "zeroshot/chance": 0.04},
      {"step": 30, "loss": 2.5, "lr": 0.2},
      # a resumed run logs step 30 again: the later value wins
      {"step": 30, "loss": 2.0, "lr": 0.2},
      {"step": 40, "zeroshot/accuracy": 0.5, "zeroshot/chance": 0.04,
       "compositionality/accuracy": 0.6, "compositionality/num_swap_object": 300.0},
  ]


def test_series_sorts_by_step_and_keeps_the_last_value_of_a_step():
  s = plots.series(list(reversed(_rows()[:2])) + _rows()[2:])
  steps, loss = s["loss"]
  np.testing.assert_array_equal(steps, [10, 20, 30])
  np.testing.assert_array_equal(loss, [4.0, 3.0, 2.0])
  np.testing.assert_array_equal(s["zeroshot/accuracy"][0], [20, 40])


def test_panels_group_evaluators_and_leave_out_chance_and_counts():
  keys = list(plots.series(_rows()))
  panels = dict(plots.curve_panels(keys))
  assert list(panels)[:3] == ["loss", "lr", "grad_norm"]
  assert panels["zeroshot"] == ["zeroshot/accuracy"]
  assert panels["compositionality"] == ["compositionality/accuracy"]


def test_training_curves_draw_the_logged_values():
  fig = plots.training_curves(_rows())
  axes = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
  assert set(axes) == {"loss", "lr", "grad_norm", "zeroshot", "compositionality"}
  x, y = axes["loss"].lines[0].get_data()
  np.testing.assert_array_equal(x, [10, 20, 30])
  np.testing.assert_array_equal(y, [4.0, 3.0, 2.0])
  x, y = axes["zeroshot"].lines[0].get_data()
  np.testing.assert_array_equal(y, [0.3, 0.5])
  assert plots.training_curves([{"step": 1}]) is None


def test_write_training_curves_writes_a_png(tmp_path):
  import json

  assert plots.write_training_curves(str(tmp_path)) is None  # no metrics.jsonl yet
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
  path = plots.write_training_curves(str(tmp_path))
  assert path == str(tmp_path / "plots" / plots.CURVES_PNG)
  with Image.open(path) as im:
    assert im.format == "PNG" and im.size[0] > 600 and im.size[1] > 300
  with Image.open(io.BytesIO(plots.to_png(plots.training_curves(_rows())))) as im:
    assert im.format == "PNG"


def test_confusion_matrix_matches_sklearn():
  """The shared ``C[predicted, true]`` the figures draw transposed."""
  from bigvl.evaluators._confusion import confusion_matrix

  rng = np.random.default_rng(0)
  truth, pred = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
  np.testing.assert_array_equal(confusion_matrix(pred, truth, 5, 5, ignore_label=None).T,
                                sk_confusion(truth, pred, labels=range(5)))


def test_confusion_figure_is_row_normalised_true_by_predicted():
  c = np.array([[8, 2, 0], [0, 5, 5], [1, 0, 0]])
  fig = plots.confusion_figure(c, ["a", "b", "c"])
  shown = fig.axes[0].images[0].get_array()
  np.testing.assert_allclose(shown, [[0.8, 0.2, 0.0], [0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])
  assert "accuracy 0.619" in fig.axes[0].get_title()  # (8 + 5 + 0) / 21
  assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["a", "b", "c"]


def test_gallery_shows_each_querys_top_k_images_in_order():
  images = np.stack([np.full((4, 4, 3), 10 * i, np.uint8) for i in range(8)])
  sims = np.array([[0.1, 0.9, 0.3, 0.8, 0.0, 0.2, 0.7, 0.6],
                   [0.5, 0.1, 0.2, 0.3, 0.9, 0.8, 0.0, 0.4]])
  fig = plots.retrieval_gallery(["first query", "second"], images, sims, targets=[3, 0], k=3)
  grid = np.array(fig.axes).reshape(2, 4)
  for q, want in enumerate(([1, 3, 6], [4, 5, 0])):
    shown = [int(ax.images[0].get_array()[0, 0, 0]) // 10 for ax in grid[q, 1:]]
    assert shown == want
    titles = [ax.get_title() for ax in grid[q, 1:]]
    assert titles[0] == f"#1  {sims[q, want[0]]:.2f}"
  assert [grid[q, 0].texts[0].get_text() for q in range(2)] == ["first query", "second"]
  # the query's own image is framed (image 3 is query 0's second hit, image 0 query 1's third)
  assert grid[0, 2].spines["top"].get_linewidth() == 3
  assert grid[0, 1].spines["top"].get_linewidth() == 1
  assert grid[1, 3].spines["top"].get_linewidth() == 3


def test_heatmap_and_strips_show_their_arrays():
  sims = np.arange(12.0).reshape(3, 4)
  fig = plots.similarity_heatmap(sims)
  np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), sims)
  strips = [np.zeros((8, 24, 3), np.uint8), np.full((8, 24, 3), 255, np.uint8)]
  fig = plots.image_strips(strips, "t", captions=["x", "y"])
  assert [ax.get_title() for ax in fig.axes] == ["x", "y"]
  np.testing.assert_array_equal(fig.axes[1].images[0].get_array(), strips[1])


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_float_images_are_rescaled_for_display(dtype):
  from matplotlib.figure import Figure

  ax = Figure().subplots()
  img = (np.arange(48).reshape(4, 4, 3) * (5 if dtype == np.uint8 else -0.1)).astype(dtype)
  plots._show_image(ax, img)
  shown = np.asarray(ax.images[0].get_array())
  if dtype == np.uint8:
    np.testing.assert_array_equal(shown, img)
  else:
    assert shown.min() == pytest.approx(0.0) and shown.max() == pytest.approx(1.0)
