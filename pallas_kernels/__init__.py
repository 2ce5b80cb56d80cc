"""Array kernels with their XLA references and one dispatch point each. Knows nothing of K2."""
