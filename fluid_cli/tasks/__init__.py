"""lm-evaluation-harness task files that ship with fluid.

`arithmetic.yaml` (the demo task) and `humaneval.yaml` (HumanEval scored by `utils.pass_at_k`, which runs the
programs locally instead of fetching the `code_eval` metric from the hub) are ordinary lm-eval task YAMLs; this
folder can be handed to `lm_eval --include_path`. `utils.py` holds the functions the YAMLs and `fluid eval`'s
local-data overrides refer to.
"""
