"""Triton kernels of visprune (installed as ``visprune.triton_kernels``)."""
