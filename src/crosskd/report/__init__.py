"""What a finished (or running) distillation did, read back from its run folder: `crosskd report` (an HTML page of
plots and a summary table) and the exported student's model card."""
