"""Reading and writing files that may come from anyone: atomic saves, bounded YAML, guarded regexes."""
