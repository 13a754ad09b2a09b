"""Kernels behind the engine: the reference path and the fast paths, chosen by `dispatch`."""
