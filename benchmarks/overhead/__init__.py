"""Overhead benchmark: what XGradCallback costs per step, against the optimizer's own update and a naive XGrad.

``steps`` (:mod:`.steps`) times the callback inside a real ``Trainer`` on synthetic batches: an optimizer-bound
``mlp`` (50 blocks of Linear(256) + LayerNorm(256) at batch 4: 200 tensors, 3.3 M params) and a compute-bound
``cnn`` (3x32x32 images at batch 64), each with AdamW and SGD momentum (``foreach=True``; ``--cases mlp-adamw_fused``
is AdamW with ``fused=True``), with ``XGradCallback``, ``XGradCallback(compile=True)`` and a naive XGrad (the
official code's per-parameter loop). It reports the hooks' time next to the optimizer's update, the whole-step
overhead with its 95% interval, and the memory the callback holds and allocates.

``calls`` (:mod:`.calls`) counts what one ``OptimizerPredictor.predict()`` + ``restore()`` dispatches, for every
rule family on models of 40, 400 and 4000 tensors: ATen calls and their growth (at most 2x from 40 to 4000), host
reads, CUDA kernel launches, transient memory against max(largest tensor, chunk_bytes), and the cost of an unused
trainable module.

``compile`` (:mod:`.compile_sizes`, CPU) times predict() + restore() eager against the compiled kernel forced on,
for AdamW buckets from 0.05 to 12.5 MiB in 1 to 200 tensors, with a training step between them: where
``compile=True`` pays off, and so the default ``compile_min_bytes``.

Results go to ``NAME.{md,json,png}`` in ``--out`` (default: a new folder under ``benchmarks/runs/``, which git
ignores); ``--publish`` also writes them to ``benchmarks/results/``, the published results the docs link to.
Run from the repository root:

    python -m benchmarks.overhead all --publish --chunk-bytes 33554432    # the published run (every measurement)
    python -m benchmarks.overhead steps --runs 2 --steps 20 --cases mlp-adamw
    python -m benchmarks.overhead calls --calls-sizes 40 400 --calls-rules AdamW "SGD momentum"
    python -m benchmarks.overhead compile --compile-buckets 14x8192 200x16384
    python -m benchmarks.overhead replot benchmarks/results/overhead.json --publish    # redraw the plot only

``benchmarks/gpu_check.sh`` runs both on CUDA, the step timing also with ``--precision bf16-mixed``.
"""
