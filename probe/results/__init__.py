"""What a probe run produces, as data: the results columns, per-image predictions, the rows read
back from a results folder, and the summary over seeds."""
