"""Study tools: paired multi-seed comparisons of the multi-task strategies."""
