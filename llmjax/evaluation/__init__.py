"""Task evaluation: log-likelihood scoring of (context, continuation) requests and the
lm-evaluation-harness backend built on it."""
