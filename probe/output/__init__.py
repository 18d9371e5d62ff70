"""What a probe run shows: the results folder (CSV, protocol.json), plots, markdown tables, the
leaderboard and the self-contained HTML report."""
