"""Baselines benchmark: the char-GPT with the optimizers users would pick instead of AdamW, each with and without XGrad.

Methods (:mod:`.methods`): AdamW, NAdam (decoupled weight decay), schedule-free AdamW (the ``schedulefree`` package,
switched between its train and eval modes by the model) and Lookahead over AdamW (pytorch-optimizer, k=5, alpha=0.5),
each alone and with ``XGradCallback(steps=1)``: eight arms. Every arm gets its own best lr from the same grid
(:mod:`.tuning`): one short run per lr (seed 0, 300 steps, the schedule shrunk to that length), trained without a
held-out tuning split and validated on it; then every arm runs at its lr for the full 1,000 steps over 3 seeds,
validated on the reported split. The report (:mod:`.report`) says which lr won for each arm and whether it sits at the
grid's edge, and gives the noise rule's verdicts (``lightning_xgrad.sweep.stats``) for each method + XGrad against
the method alone, each method against AdamW, and each method against AdamW + XGrad.

Every run is a LightningCLI subprocess of ``examples/char_gpt.py`` through the sweep machinery (see
``benchmarks/arms.py``): ``--jobs 2`` runs two at a time, ``--resume`` keeps every finished run. Results go to
``NAME.{md,json,png}`` in ``--out`` (default: a new folder under ``benchmarks/runs/``, which git ignores);
``--publish`` also writes them to ``benchmarks/results/``. Run from the repository root:

    python -m benchmarks.baselines --out benchmarks/runs/baselines --jobs 2 --threads 1 --publish   # the full run
    python -m benchmarks.baselines --out benchmarks/runs/baselines --resume --jobs 2 --threads 1 --publish  # go on
    python -m benchmarks.baselines --quick --methods adamw nadam       # a tiny model, a few steps: does it all run?
    python -m benchmarks.baselines --replot benchmarks/results/baselines.json --publish    # redraw the plot only
"""
