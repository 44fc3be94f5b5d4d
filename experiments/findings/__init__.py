"""Published MoE findings reproduced at the study's size (experiments/findings/run.py).

One module per finding: its runs (train.py runs of configs/moe_vs_dense.py's arms, through
experiments/study's runner), the paper's claim, and a summary that puts this project's numbers
beside the paper's with a verdict. docs/findings.md shows the records in docs/results/findings/.
"""
