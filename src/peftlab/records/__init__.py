"""What a study recorded: its runs (SQLite), their results as rows, the rates its tuning chose."""
