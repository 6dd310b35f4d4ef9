"""The training application: the recipe (Trainer) and the small modules it is built from."""
