"""The byte chain: compression, sha256 and atomic files (pipeline)."""
