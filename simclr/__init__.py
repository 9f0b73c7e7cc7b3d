"""The library behind the scripts at the repository root: one job per module, nothing runs on import.

See docs/architecture.md for the modules and the path of a batch from disk to the CSV.
"""
