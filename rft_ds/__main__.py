"""`python -m rft_ds ...` and `deepspeed --module rft_ds train CONFIG ...`: the `rft-ds` command."""

from rft_ds.cli import end_process, main

end_process(main())
