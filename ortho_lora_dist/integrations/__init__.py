"""Drop-ins for the trainers users already run: transformers.Trainer (transformers.py), TRL's SFTTrainer (trl.py)."""
