"""Chat formatting, tokenisation and the training loop."""
