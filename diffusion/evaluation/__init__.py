"""The pieces of ``--mode evaluate`` / ``--mode sample``, one job per module:

- `settings`: the ``config.eval`` fields, their validation, and the reference / floor splits;
- `generator`: samples from a checkpoint's EMA parameters with the configured sampler;
- `references`: the FID reference statistics per split (cached) and `compute_fid_kid`;
- `step_data`: the samples of the step being evaluated, drawn once, and their Inception features;
- `floor`: the real-data FID floor, computed once and kept in ``eval/real_floor.json``;
- `evaluators`: the metrics behind one interface (FID / KID / IS against a split, bits/dim on
  a split), chosen by ``config.eval``, and the `EvalContext` they share;
- `results`: the resumable results store (``eval/results.json`` keyed by step and settings) and
  the cached sample / feature files.

`diffusion.evaluate.run` drives them over the checkpoints of a workdir. This package imports
only from layers below it (factories, maths, metrics, data, I/O), never from `train` or
`evaluate`.
"""
