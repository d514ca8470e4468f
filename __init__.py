"""GranViT as an installed package: the Hub files plus native ``Auto*`` registration."""
