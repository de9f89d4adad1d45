"""`python -m fedfuse`: the `fedfuse` command line."""

from fedfuse.cli import main

main()
