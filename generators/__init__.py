"""Generative models: network definitions, noise schedules, sampling, model bundles."""
