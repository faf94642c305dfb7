"""Mixed-precision search: layer roles, sensitivity, per-role metrics, the budgeted allocation."""
