"""Benchmarks run from the command line (``dlm bench …``): ``compare`` trains and evaluates
several families side by side (spec.py: what is compared; compare.py: plan, train, evaluate,
resume; measures.py: the figures; report.py: Markdown and JSON; plots.py: PNGs)."""
