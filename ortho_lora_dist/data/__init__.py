"""Task data: reading and checking records from every source, prompt templates, the multi-task sampler."""
