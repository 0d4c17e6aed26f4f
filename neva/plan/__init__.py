"""``python -m neva.plan``: what a parallel layout costs each GPU for a real model, printed from meta
tensors (nothing is allocated). The command is ``neva/plan/__main__.py``; the accounting it prints
is ``neva/planner.py``; the layout and placements themselves are ``neva/parallel/plan.py``."""
