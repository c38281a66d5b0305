"""Network parts: the models, local-loss blocks and the rewritten softmax / cross-entropy."""
