"""fastv-analysis: offline analysis of FastV-style visual-token pruning in VLMs.

Stages: capture (run the full model once, cache layer K-1 attention) -> select
(replay selection strategies on the cache) -> eval (re-run with pruning) -> report.
"""

__version__ = "0.1.0"
