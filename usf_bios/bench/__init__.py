"""Benchmarks: our engine against Hugging Face Trainer + peft on random-weight models of real shapes."""
