"""Tools run from the repository root (`python -m benchmarks.<tool>`), outside the installed package: the GPU
session script, profiling, and the kernels' tuning tools (benchmarks/tuning). The product's benchmarks are
`gnsrepro bench ...`."""
