"""eval layer of mgpo."""
