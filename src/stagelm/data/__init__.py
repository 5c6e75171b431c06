"""Data: the built-in small world and one LightningDataModule per data type."""
