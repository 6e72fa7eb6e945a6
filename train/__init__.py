"""Ingestion, de-identification, the private cohort store and DP training."""
