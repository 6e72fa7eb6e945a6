"""Memorization filter and privacy audits. Reads private data; never imported by generators."""

from privacy_filters.memorization import FilterDecision, MemorizationFilter, public_summary

__all__ = ["FilterDecision", "MemorizationFilter", "public_summary"]
