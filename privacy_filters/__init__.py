"""Memorization filter and privacy audits. Reads private data; never imported by generators."""
