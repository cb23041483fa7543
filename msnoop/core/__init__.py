"""Foundations every stage builds on: config base, table conventions, Parquet parts, filters, Ray runtime."""
