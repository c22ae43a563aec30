"""Training, data, reproductions and plots for sparseopt-jax (public API only)."""
