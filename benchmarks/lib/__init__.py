"""The benchmarks' shared harness: timing, flags, records, steps.

Scripts in benchmarks/ are thin and run as modules from the repository root
(`python -m benchmarks.NAME`): they build what they time and hand it to
`timing` (the FLOP model is dro_fast/training/flops.py, which the trainer's
progress lines share); `flags` holds the flags several scripts share;
`records` writes the JSON lines that benchmarks/RESULTS.md cites; `step`
builds the DRO-V (and baseline) train step; `kernel_cases` the kernel
benchmarks' named shapes; `numpy_reference` the float64 answers the kernels'
numerics are checked against; `tpu` deviceless TPU compilation.
"""
