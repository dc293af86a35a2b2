"""What a run will train, decided before it trains: the plan, the budget match, the importance scores."""
