"""Evaluation: held-out NLL on assistant tokens, generation samples, and bridges to external harnesses."""
