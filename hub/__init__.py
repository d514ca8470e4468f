"""Releasing GranViT: push a checkpoint + model card + demo Space (`granvit-push`), export the trained ViT as a plain
checkpoint of its own architecture (`granvit-export-encoder`)."""
