"""Tests of what users deploy: the launcher, SLURM scripts, the wheel, project templates, the GPU check script."""
