"""The MoE-vs-dense study's library; experiments/moe_vs_dense.py is its entry point.

plan.py says which runs each stage trains, runs.py trains, resumes and loads them, analysis.py
turns their records into schedule-fair speedups, report.py writes the tables and plots, and
stages.py runs the stages in order.
"""
