"""Small-scale reproductions of the paper's ablations on the synthetic set (see EXPERIMENTS.md at the repo root)."""
