"""CLIP-DPO on synthetic scenes: an SFT LVLM that hallucinates, its own candidates ranked by a
SigLIP model, DPO against the frozen SFT model (Ouali et al., ECCV 2024).

The data is ``shapes_captions/cooc``: objects co-occur (a red circle usually comes with a green
square) and the SFT pool's descriptions and yes/no answers name an absent co-occurring object
30% of the time, as real SFT data does. Run the stages in order (``bench/experiments/
clip_dpo_shapes.py`` runs them all, for several seeds)::

  python -m bigvl.main --config configs/clip_dpo_shapes.py:tiny,stage=sft --workdir W/sft
  python -m bigvl.main --config configs/clip_dpo_shapes.py:tiny,stage=ranker --workdir W/clip
  python -m bigvl.main --config configs/clip_dpo_shapes.py:tiny,stage=candidates,sft=W/sft \\
      --workdir W/cand
  python -m bigvl.main --config configs/clip_dpo_shapes.py:tiny,stage=rank,ranker=W/clip,\\
candidates=W/cand --workdir W/rank
  python -m bigvl.main --config configs/clip_dpo_shapes.py:tiny,stage=dpo,sft=W/sft,\\
preferences=W/rank --workdir W/dpo

``pairing=random`` (rank stage) is the ablation without CLIP ranking; ``reference=frozen |
adapters_off | precomputed`` chooses DPO's reference (``bigvl.tasks.clip_dpo``). The DPO run
evaluates the SFT model at step 0 (``eval_at_start``) and the policy at the end: POPE
(random / popular / adversarial), CHAIR / Cover / Hal / Cog of generated descriptions and
zero-shot classification through the LVLM (``bigvl.evaluators.hallucination``).
"""

import ml_collections as mlc

from bigvl.config import load_sibling, parse_arg

STAGES = ("sft", "ranker", "candidates", "rank", "dpo")


def _hallucination_eval(every: int, tiny: bool) -> dict:
  return dict(type="hallucination", every=every, split="test",
              num_examples=128 if tiny else 500, batch_size=64, stats_split="train",
              stats_examples=2000)


def sft_config(a) -> mlc.ConfigDict:
  """The SFT LVLM: the tiny captioner's model, trained on the pool's (noisy) descriptions, short
  captions and yes/no answers."""
  c = load_sibling(__file__, "lvlm_shapes").get_config("tiny" if a.tiny else None)
  c.seed = a.seed
  c.total_steps = 1500 if a.tiny else 20_000
  c.input.dataset = "shapes_captions/cooc"
  c.input.template = "question"
  del c.input.answer_key, c.input.question  # one field -> several (typed ConfigDict fields)
  c.input.answer_key = ("caption", "sft_description", "sft_answer")
  c.input.question = ("caption", "description", "@question")
  c.input.seq_len = 160 if a.tiny else 256
  c.generate = mlc.ConfigDict({"max_new_tokens": 40 if a.tiny else 64})
  c.evals = mlc.ConfigDict()
  c.evals.hallucination = _hallucination_eval(c.total_steps, a.tiny)
  return c


def get_config(arg=None):
  a = parse_arg(arg, tiny=False, stage="sft", seed=0, sft="", ranker="", candidates="",
                preferences="", pairing="clip", reference="frozen")
  if a.stage not in STAGES:
    raise ValueError(f"stage={a.stage!r}: one of {STAGES}")
  if a.stage in ("ranker", "rank"):
    # the ranker is pre-trained elsewhere, as CLIP is: on independent scenes, without the
    # pool's co-occurrence bias (and longer than the tiny two-tower default)
    c = load_sibling(__file__, "siglip_shapes").get_config("tiny" if a.tiny else None)
    c.seed = a.seed
    c.input.dataset = "shapes_captions"
    if a.tiny:
      c.total_steps = 2400
      c.schedule.warmup_steps = 200
    if a.stage == "ranker":
      return c
    c.evals = mlc.ConfigDict()
    c.tool = "clip_dpo_rank"
    c.init_from = mlc.ConfigDict({"ranker": dict(path=a.ranker or mlc.config_dict.placeholder(
        str))})
    c.rank = mlc.ConfigDict()
    c.rank.candidates = a.candidates or mlc.config_dict.placeholder(str)
    c.rank.dataset = "shapes_captions/cooc"  # the candidates' images
    c.rank.split = "train"
    c.rank.batch_size = 256
    c.rank.sentence_agg = "mean"
    c.rank.qa_template = "there is a {object}"
    c.rank.qa_threshold = mlc.config_dict.placeholder(float)  # None: the pool's median
    c.rank.text_probes = ()  # rendered scenes hold no text; real data: ('a photo of text', ...)
    c.rank.seed = a.seed
    c.rank.rules = dict(min_gap=2.0, both_bad=mlc.config_dict.placeholder(float),
                        min_chosen=mlc.config_dict.placeholder(float),
                        max_rejected=mlc.config_dict.placeholder(float),
                        max_length_ratio=2.0, include_gt=True, pairing=a.pairing,
                        pairs_per_group=1)
    return c

  c = sft_config(a)
  if a.stage == "sft":
    return c
  sft = a.sft or mlc.config_dict.placeholder(str)
  if a.stage == "candidates":
    c.tool = "clip_dpo_candidates"
    c.evals = mlc.ConfigDict()
    c.init_from = mlc.ConfigDict({"sft": dict(path=sft, dst="params")})
    c.candidates = mlc.ConfigDict()
    c.candidates.split = "train"
    c.candidates.num_images = 1024 if a.tiny else 10_000
    c.candidates.batch_size = 64
    c.candidates.chunk_images = 256
    c.candidates.prompts = ("caption", "description")
    c.candidates.temperatures = (0.7, 1.0)
    c.candidates.top_p = (0.9, 1.0)
    c.candidates.samples = 2
    c.candidates.gt = {"description": "sft_description"}
    c.candidates.qa_key = "question"
    return c

  # stage == 'dpo': LoRA on the SFT LM, the SFT model as the frozen reference.
  c.task = "clip_dpo"
  c.total_steps = 300 if a.tiny else 2000
  c.log_every = 25 if a.tiny else 50
  c.ckpt_every = c.total_steps
  c.eval_at_start = True
  c.input.preferences = a.preferences or mlc.config_dict.placeholder(str)
  c.input.batch_size = 16 if a.tiny else 64
  del c.input.answer_key, c.input.question, c.input.max_images
  c.model.lora = dict(rank=8, alpha=16.0, dropout=0.0,
                      targets=r"attn/(q|k|v|o)$|mlp/(gate|up|down)$")
  c.model.trainable = r"lora_[ab]$"
  c.init_from = mlc.ConfigDict({"policy": dict(path=sft, dst="params/policy", src="params",
                                               keep_init=r"lora_[ab]$")})
  c.dpo = mlc.ConfigDict()
  c.dpo.beta = 0.1
  c.dpo.kind = "sigmoid"
  c.dpo.label_smoothing = 0.0
  c.dpo.reference = a.reference
  c.dpo.reference_path = sft if a.reference == "frozen" else mlc.config_dict.placeholder(str)
  # DPO + the chosen answer's NLL (RPO, Pang et al. 2024): plain DPO at lr 1e-3 lowered both
  # likelihoods and the tiny policy degenerated (repeated words); docs/clip_dpo.md
  c.dpo.sft_weight = 1.0
  c.optim.lr = 3e-4 if a.tiny else 5e-5
  c.schedule = mlc.ConfigDict({"warmup_steps": 20 if a.tiny else 100, "decay": "cosine"})
  c.evals = mlc.ConfigDict()
  c.evals.hallucination = _hallucination_eval(c.total_steps, a.tiny)
  return c
