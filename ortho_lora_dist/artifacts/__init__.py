"""What a run leaves behind and what reads it: the self-describing adapter, model card, predict, merge, plots."""
