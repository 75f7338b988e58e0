"""Weight prediction for one optimizer, in plain torch (no Lightning): :class:`~.predictor.OptimizerPredictor`
predicts and restores, :mod:`.plan` groups the parameters into buckets, :mod:`.snapshot` keeps the real weights,
:mod:`.state_dict_hook` reports them to every ``state_dict()``, and :mod:`.quality` measures how well a prediction
tracked the update. The public names are exported by :mod:`lightning_xgrad`.
"""
