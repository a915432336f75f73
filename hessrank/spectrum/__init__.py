"""Spectra: dense float64 eigen-solves, Lanczos and stochastic Lanczos quadrature."""
