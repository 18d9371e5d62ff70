"""The columns of results.csv: one row per store × view × seed × shots × method configuration."""

# One row per store × view × seed × shots × method configuration (a linear head, a k, a C).
# Accuracies are percent (*_pct). The select_* columns are the split the LR/k/C was chosen on,
# report_* the split reported once (named in report_split, described in reported_as); report_*
# never hold another split's numbers. Columns that do not apply to a method are empty.
COLUMNS = [
    "label", "store", "encoder", "weights_sha256", "dataset", "view", "method", "shots", "seed",
    "lr", "wd", "k", "temperature", "C", "refit", "optimizer", "epochs",
    "batch_size", "momentum", "normalize", "select_on", "train_split", "select_split", "report_split",
    "reported_as", "n_train", "n_select", "n_report", "excluded_invalid", "excluded_nonfinite",
    "train_top1_pct", "select_top1_pct", "report_top1_pct", "ci95_low", "ci95_high", "wilson95_low", "wilson95_high",
    "train_top5_pct", "select_top5_pct", "report_top5_pct",
    "train_loss", "diverged", "selected", "best_report", "protocol_hash", "device", "dtype", "sweep_seconds",
    "augment",  # what a linear head trained on: "rrc-flip:K", one of K stored views per row per epoch; empty: the center crop
]  # fmt: skip

# Columns read back as text whatever they look like: a store labelled "1", "1e3" or "true", a hash of
# digits only, stay themselves (results.csv's other columns are numbers, booleans or empty).
TEXT_COLUMNS = frozenset({
    "label", "store", "encoder", "weights_sha256", "dataset", "view", "method", "optimizer", "normalize", "select_on",
    "train_split", "select_split", "report_split", "reported_as", "protocol_hash", "device", "dtype", "augment",
})  # fmt: skip
