"""Kernels: the fastest implementation per platform behind one function each."""
