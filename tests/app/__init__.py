"""Tests of the training application: data, models, evaluation, the recipe, artifacts, hardening."""
