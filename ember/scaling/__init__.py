"""Scaling laws on your own runs: `sweep` trains a grid of sizes x tokens, `law` fits
Chinchilla's L(N, D) = E + A / N^alpha + B / D^beta to it, `plot` draws the fit."""
