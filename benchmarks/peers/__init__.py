"""The same recipe in the stacks users would pick instead, run as separate processes."""
