"""Long-run benchmark: the char-GPT trained 5,000 steps with AdamW, with and without XGrad: does the gap last?

Both arms are the published char-GPT recipe (examples/configs/char_gpt.yaml, AdamW lr 3e-3) trained 50 epochs of 100
batches instead of 10: the warm-up keeps its 100 steps and the cosine decay stretches to the last step (the schedule
reads ``trainer.estimated_stepping_batches``), validation every epoch on the reported split, 3 seeds. The report
(:mod:`.report`) gives the final table, the paired gap (XGrad minus AdamW, seed by seed) at 20%, 50% and 100% of the
run with its standard error, and whether the gap grows, shrinks or persists from each earlier point to the end
(:mod:`.gaps`: the change of the paired gap, judged by the noise rule of ``lightning_xgrad.sweep.stats``); the figure
shows both validation curves over the whole run above their paired difference.

Every run is a LightningCLI subprocess of ``examples/char_gpt.py`` through the sweep machinery (see
``benchmarks/arms.py``): ``--jobs 2`` runs both arms at once, ``--resume`` keeps every finished run. Results go to
``NAME.{md,json,png}`` in ``--out`` (default: a new folder under ``benchmarks/runs/``, which git ignores);
``--publish`` also writes them to ``benchmarks/results/``. Run from the repository root:

    python -m benchmarks.long_run --out benchmarks/runs/long_run --jobs 2 --threads 1 --publish    # the full run
    python -m benchmarks.long_run --out benchmarks/runs/long_run --resume --jobs 2 --threads 1 --publish  # go on
    python -m benchmarks.long_run --quick                    # a tiny model, 20 steps, 2 seeds: does it all run?
    python -m benchmarks.long_run --replot benchmarks/results/long_run.json --publish    # redraw the plot only
"""
