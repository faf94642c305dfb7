"""Pure data: recipes, plans, budgets and what the kernels can run (capabilities)."""
