"""Trainers, one folder per stage (`rm/`, `dpo/`), and the dispatcher `tuner.run_exp`."""
