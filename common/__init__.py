"""What every layer of flowlab may import: the shared error type (nothing here imports the rest)."""
