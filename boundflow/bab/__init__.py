"""Branch-and-bound: deciding what one bound over the whole input region cannot.

A property left open by the bounds of its input box is split into sub-problems (domains) that
are bounded in batches, each batch one run of a bound plan (``bounder.PlanBounder``), until
every domain is proven, a counterexample is confirmed, or the budget runs out.

- ``input_split``: domains are sub-boxes of the input (for low-dimensional inputs, such as
  ACAS Xu's five).
- ``relu_split``: domains fix unstable ReLUs active or inactive, a split state the plan takes
  as an input (for the rest).
- ``config.BabConfig``: the search's settings; ``strategy="auto"`` picks input splitting
  where the input has at most ``INPUT_SPLIT_MAX_DIMS`` dimensions, ReLU splitting elsewhere.
"""

from boundflow.bab.config import INPUT_SPLIT_MAX_DIMS, BabConfig, BabResult, choose_strategy
from boundflow.bab.input_split import input_split
from boundflow.bab.relu_split import relu_split

__all__ = ["BabConfig", "BabResult", "INPUT_SPLIT_MAX_DIMS", "choose_strategy", "input_split",
           "relu_split"]
