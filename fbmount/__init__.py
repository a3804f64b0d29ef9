"""fbmount: mount an S3-compatible bucket as a directory."""

__version__ = "0.1.0"
