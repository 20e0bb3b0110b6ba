"""Everything that produces or measures a world-model bundle: collection, training stages, evaluation, CLI."""
