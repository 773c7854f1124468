"""Launch marshalling of the CUDA C++ kernels in ``csrc/`` (docs/design.md §4): each function takes
tensors, fills the argument struct of ``elastic_kernels._C`` with raw pointers, sizes, strides and
the current stream, and launches. One module per op family, with the same function names as the
Triton launchers of that family where both exist (:mod:`elastic_kernels.triton`)."""
