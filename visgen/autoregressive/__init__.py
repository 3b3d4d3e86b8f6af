"""Sampling discrete tokens: logit guidance and filtering (shared by token paradigms), the KV-cache AR sampler."""
