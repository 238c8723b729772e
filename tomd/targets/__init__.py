"""Stage 2: targets: names, positions, matching, import/export."""
