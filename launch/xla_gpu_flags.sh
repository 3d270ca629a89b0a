# Source this file before starting a GPU run:  . launch/xla_gpu_flags.sh
#
# The paper overlaps the gradient all-reduce with backprop (section 4): each
# layer's gradients are reduced as soon as they exist. In XLA the same effect
# comes from two flags:
#   --xla_gpu_enable_latency_hiding_scheduler=true
#       lets the scheduler start the asynchronous all-reduce early and run the
#       remaining backward convolutions while it is in flight;
#   --xla_gpu_all_reduce_combine_threshold_bytes=N
#       combines many small per-layer all-reduces into buckets of up to N bytes
#       (ResNet-50 has ~160 gradient tensors, most below 1 MB): fewer, larger
#       NCCL calls, while keeping several buckets so that overlap remains.
#       32 MiB gives ResNet-50's ~100 MB of float32 gradients about 4 buckets.
# Flags that a given jaxlib does not know make XLA refuse to start; print
# XLA_FLAGS (the benchmark does) when comparing versions.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_all_reduce_combine_threshold_bytes=33554432"
# Let XLA take most of the GPU memory up front (fewer fragmentation stalls).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
#
# Candidates, not set here: each is A/B-ed per compile, in one process, by
#   python experiments/bench_train_step.py ... --variant 'today=' \
#       --variant 'fast_min_max=--xla-option xla_gpu_enable_fast_min_max=true'
# (experiments/gpu_check.sh does it), and joins this file only if that call shows it faster.
#   xla_gpu_enable_fast_min_max=true                  min/max without NaN propagation
#   xla_gpu_experimental_enable_conv_fusion=true      epilogue fusion into convolutions
