"""Training stages: one LightningModule each, all over the same backbone."""
