"""Interoperation: Hugging Face export and ingest, TransformerLens bridges."""
