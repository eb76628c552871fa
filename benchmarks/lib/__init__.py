"""The benchmarks' shared harness: timing, the FLOP model, flags, records.

Scripts in benchmarks/ are thin: they build what they time and hand it to
`timing`; `flops` counts the work; `flags` holds the flags several scripts
share; `records` writes the JSON lines that benchmarks/RESULTS.md cites;
`step` builds the DRO-V (and baseline) train step; `kernel_cases` the
kernel benchmarks' named shapes.
"""
