"""Pallas kernels (TPU; interpret mode elsewhere): the mining attention. Above ``parallel`` only."""
