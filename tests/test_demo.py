"""The README's demo, end to end, and what a newcomer does next with it: evaluate the trained
workdir from the command line (``python -m bigvl.eval``) and in ``notebooks/evaluate.ipynb``.

The demo, ``configs/siglip_shapes.py:tiny`` on a fresh data dir (the dataset is built, the
tokenizer trained), reaches the zero-shot accuracy and R@1 it is known for
(docs/results/siglip_clip_shapes.md: 27.5% zero-shot, R@1 24.4% i2t and 21.7% t2i), not
merely a few times chance (4.2% and 0.1%), which a half-broken tower also reaches. The
command-line evaluation and the notebook must reproduce the train loop's own final
evaluation of the same checkpoint and draw their figures."""

import json
import os
import re
import shlex

import pytest
from PIL import Image

from tests.helpers import REPO, run_main, subprocess_env

CONFIG = "configs/siglip_shapes.py:tiny"
WORKDIR = "/tmp/bigvl/siglip"


def readme_demo() -> tuple[list[str], list[str]]:
  """The README's first command, ``pip install ... && python -m bigvl.main ARGS && python -m
  bigvl.eval ARGS``: ``(main ARGS, eval ARGS)``; docs/index.md must show the same line."""
  text = open(os.path.join(REPO, "README.md")).read()
  line = re.search(r"```console\n(.*?)\n", text).group(1)
  install, train, evaluate = (shlex.split(part) for part in line.split(" && "))
  assert install[:3] == ["pip", "install", "-e"]
  assert train[:3] == ["python", "-m", "bigvl.main"]
  assert evaluate[:3] == ["python", "-m", "bigvl.eval"]
  assert line in open(os.path.join(REPO, "docs", "index.md")).read()
  return train[3:], evaluate[3:]


def test_readme_demo_is_the_command_tested_here():
  train, evaluate = readme_demo()
  assert train == evaluate == ["--config", CONFIG, "--workdir", WORKDIR]
#: the figures a two-tower run's evaluation draws (bigvl/eval.py), as PNG file stems
FIGURES = ("training_curves", "retrieval_gallery", "retrieval_similarity", "zeroshot_confusion")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  """The README's demo command, trained once for this file, with the users' XLA flags (the
other tests' processes compile at -O1, tests/helpers.py): ``(workdir, env)``."""
  root = tmp_path_factory.mktemp("demo")
  env = {"BIGVL_DATA": str(root / "data")}
  train, _ = readme_demo()
  out = run_main([a.replace(WORKDIR, str(root / "w")) for a in train], env_extra=env,
                 timeout=1800, user_xla=True)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "ex/s" in out.stdout and "ETA" in out.stdout  # the progress line
  return root / "w", env


def _loop_results(workdir):
  return json.loads((workdir / "results.json").read_text())


def _assert_same_evaluation(got: dict, want: dict):
  assert got["step"] == want["step"] == 800
  assert set(got) == set(want)
  for k in want:  # the same checkpoint, the same evaluators: the same numbers
    assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), k


def _assert_png(path):
  with Image.open(path) as im:
    assert im.format == "PNG" and min(im.size) >= 200, path


@pytest.mark.slow
def test_siglip_tiny_demo_beats_chance(demo):
  workdir, env = demo
  res = _loop_results(workdir)
  print(res)
  assert res["zeroshot/chance"] == pytest.approx(1 / 24)
  assert res["retrieval/chance_R@1"] == pytest.approx(1 / 1000)
  # 5-7 points below what the demo reaches (zero-shot 28.0%, R@1 23.9% / 21.7%, R@5 45.7% /
  # 59.4% on a 2-core CPU), for platform drift. An image tower that sees one colour channel
  # of three still reaches R@1 14.3% / 17.0% and R@5 34.0% / 47.9%: it fails here.
  assert res["zeroshot/accuracy"] > 0.20
  for d in ("i2t", "t2i"):
    assert res[f"retrieval/{d}_R@1"] > 0.17
    assert res[f"retrieval/{d}_R@5"] > 0.40
  assert os.path.exists(os.path.join(env["BIGVL_DATA"], "shapes_captions",
                                     "tokenizer_word4096.json"))
  assert list((workdir / "tb").glob("events.out.tfevents.*"))
  _assert_png(workdir / "plots" / "training_curves.png")  # written at the end of every run


@pytest.mark.slow
def test_eval_cli_reproduces_the_loops_final_evaluation(demo):
  workdir, env = demo
  out_dir = workdir / "eval"
  _, evaluate = readme_demo()
  res = run_main([a.replace(WORKDIR, str(workdir)) for a in evaluate], env_extra=env,
                 module="bigvl.eval", timeout=900, user_xla=True)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "bigvl.eval: wrote" in res.stdout
  _assert_same_evaluation(json.loads((out_dir / "results.json").read_text()),
                          _loop_results(workdir))
  for name in FIGURES:
    _assert_png(out_dir / f"{name}.png")
  # a step the workdir does not hold: one line, exit 2, nothing evaluated
  bad = run_main(["--config", CONFIG, "--workdir", str(workdir), "--step", "7"],
                 env_extra=env, module="bigvl.eval", timeout=300)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1].startswith("bigvl: bad config: --step 7:")


@pytest.mark.slow
def test_notebook_runs_top_to_bottom_on_the_demo_workdir(demo):
  import nbclient
  import nbformat
  workdir, env = demo
  nb = nbformat.read(os.path.join(REPO, "notebooks", "evaluate.ipynb"), as_version=4)
  old = dict(os.environ)
  kernel_env = subprocess_env({**env, "BIGVL_WORKDIR": str(workdir), "BIGVL_CONFIG": CONFIG},
                              user_xla=True)
  os.environ.clear()  # the kernel starts with a user's environment (no test XLA_FLAGS)
  os.environ.update(kernel_env)
  try:  # the kernel inherits this environment; any cell error raises here
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": os.path.join(REPO, "notebooks")}}
                            ).execute()
  finally:
    os.environ.clear()
    os.environ.update(old)
  pngs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
          if "image/png" in o.get("data", {})]
  assert len(pngs) == len(FIGURES)  # curves, gallery, heatmap, confusion: all shown
  _assert_same_evaluation(json.loads((workdir / "eval" / "results.json").read_text()),
                          _loop_results(workdir))
  for name in FIGURES:
    _assert_png(workdir / "eval" / f"{name}.png")
