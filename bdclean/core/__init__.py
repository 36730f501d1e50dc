"""Pure tensor functions (no file I/O): channel deltas, Gram statistics, scores, signatures, masks."""
