"""Stage 1: alert streams → normalised Alert records."""
