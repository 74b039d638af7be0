"""One module per group of commands; each exposes ``add(subparsers)`` functions."""
