"""Export to mlx-lm directories; load and run with mlx to verify."""
