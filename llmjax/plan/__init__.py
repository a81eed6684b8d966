"""`llmjax plan --target`: llmjax's own train and eval steps compiled for Cloud TPU slices on
any host (libtpu, the `tpu` extra), and what the compiled program says about a pod run.

topology.py  chips (HBM, peak FLOP/s, HBM / ICI / DCN bandwidth) and slice names
aot.py       build the experiment on the slice's devices, lower, compile, memory per chip
hlo.py       a roofline over the optimized HLO (loop trips, fused matmuls, collectives)
report.py    the text report, arithmetic beside the compiler's figures
sweep.py     --sweep: mesh x remat x per-chip batch, ranked by estimated tokens/s
cli.py       the command-line options
"""
