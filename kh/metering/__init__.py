"""Metering (issue 14): what each principal's nodes used, counted by the host alone.

kh.metering.usage is the typed interface (records for a principal and a time range) that rating
(`kh bill`) and `kh usage` read; kh.metering.sampler takes the samples in khd; kh.metering.store
keeps them in khd's SQLite state.
"""
