"""One module per notebook: its typed config, its cached runs and its figures."""
