"""`python -m rft_ds ...` and `deepspeed --module rft_ds train CONFIG ...`: the `rft-ds` command."""

import sys

from rft_ds.cli import main

sys.exit(main())
