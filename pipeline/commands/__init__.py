"""CLI commands: each module parses options, calls one library function and prints. No torch at import time."""
