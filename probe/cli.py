"""The ``probe`` command line: parse, call :func:`probe.fit`, print the summary. No logic here."""

from __future__ import annotations

import inspect
from typing import cast

import click
from click.core import ParameterSource

from featstore.console import OneLineErrors
from featstore.errors import UsageError

from .output.paper import SPREADS
from .protocol import DEFAULT_LOGREG_C, DEFAULT_LR_GRID, KNN_WEIGHTS, METHODS, NORMALIZATIONS, OPTIMIZERS, SELECT_ON, Protocol

_DEFAULTS = Protocol()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class _Probe(OneLineErrors):
    interrupted = "interrupted; no results were written"
    out_of_memory = "lower --batch-size or --max-memory, or run where there is more memory; no results were written"


@click.group(name="probe", cls=_Probe, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="featstore", prog_name="probe")
def main():
    """Linear probes on featstore feature stores: every head of an LR sweep trained at once."""


@main.command("fit")
@click.option(
    "--store",
    "stores",
    multiple=True,
    metavar="[LABEL=]PATH[:VIEW]",
    help="Feature store (a folder, an .h5 export or a URL); repeat to compare stores under one protocol. LABEL names it "
    "in the table, CSV and plot (default: the weights file name, else the model name); VIEW probes that view of this store only. "
    "With --rerun: LABEL=PATH is the new location of the store the run recorded as LABEL (its content digest is checked).",
)
@click.option("--model", "model", multiple=True,
              help="Instead of --store: the cached store of this model (as given to `featstore extract`); needs --dataset. Repeat to compare models.")  # fmt: skip
@click.option("--dataset", help="With --model: the dataset the cached store was extracted from (digits, imagenet, a folder, a .csv).")
@click.option("--weights", "weights", multiple=True, type=click.Path(),
              help="With --model: the checkpoint it was extracted with, when several are cached; one per --model in order, or several for one --model.")  # fmt: skip
@click.option(
    "--view",
    "views",
    multiple=True,
    metavar="NAME",
    help="Feature view of every store without its own :VIEW; repeatable. Default: every view the stores share, "
    "else each store's primary view (pool for a CNN, cls for a ViT).",
)
@click.option(
    "--lr-grid",
    "lr_grid",
    is_flag=False,
    flag_value=DEFAULT_LR_GRID,
    default=None,
    metavar="[GRID]",
    help=f"LR grid: a list 1e-4,1e-3,0.01 or a log range start:stop:count. Bare --lr-grid (or no --lr) means {DEFAULT_LR_GRID}.",
)
@click.option("--lr", type=float, default=None, help="One fixed learning rate instead of a grid.")
@click.option("--wd-grid", default="0", show_default=True, metavar="GRID", help="Weight-decay grid, same syntax (0 allowed in a list).")
@click.option("--epochs", type=int, default=_DEFAULTS.epochs, show_default=True, help="Training epochs of every head.")
@click.option("--batch-size", type=int, default=_DEFAULTS.batch_size, show_default=True, help="Minibatch rows, shared by every head.")
@click.option(
    "--optimizer",
    type=click.Choice(OPTIMIZERS),
    default=_DEFAULTS.optimizer,
    show_default=True,
    help="sgd = SGD with momentum; both use a cosine schedule.",
)
@click.option("--momentum", type=float, default=_DEFAULTS.momentum, show_default=True, help="SGD momentum.")
@click.option(
    "--normalize",
    type=click.Choice(NORMALIZATIONS),
    default=_DEFAULTS.normalize,
    show_default=True,
    help="Feature normalization; standardize = BatchNorm without affine, statistics from train.",
)
@click.option(
    "--select-on",
    type=click.Choice(SELECT_ON),
    default=_DEFAULTS.select_on,
    show_default=True,
    help="Where the LR is chosen. auto: the val split when test is reported, else a seeded train holdout (never the "
    "reported split); holdout: always the train holdout; report: the reported split itself, labelled max over it.",
)
@click.option(
    "--val-fraction",
    type=float,
    default=_DEFAULTS.val_fraction,
    show_default=True,
    help="Seeded stratified part of train held out for selection when there is no separate val split.",
)
@click.option(
    "--test-fraction",
    type=float,
    default=None,
    help="A store with a single split (a plain class-folder dataset's 'all'): draw this seeded, stratified share of "
    "every class as the report split 'drawn-test', before the selection holdout, e.g. 0.2.",
)
@click.option(
    "--seed", type=int, default=None, help=f"Seeds the minibatch order, the holdout and few-shot samples.  [default: {_DEFAULTS.seed}]"
)
@click.option(
    "--seeds",
    default=None,
    metavar="LIST",
    help="Repeat every method and shot count per seed, e.g. 0,1,2,3,4; the table shows mean ± std over seeds.",
)
@click.option(
    "--method",
    "methods",
    multiple=True,
    metavar="LIST",
    help=f"Methods to run, a comma list of {', '.join(METHODS)} (same stores, splits, seeds and samples); "
    "repeat it or list them: --method linear --method knn = --method linear,knn.  [default: linear]",
)
@click.option(
    "--shots",
    default=None,
    metavar="LIST",
    help="Few-shot training sets: examples per class, e.g. 1,5,10,25 (add 'all' for every row). Default: every row.",
)
@click.option(
    "--knn-k",
    default=",".join(map(str, _DEFAULTS.knn_k)),
    show_default=True,
    metavar="LIST",
    help="k-NN: neighbour counts, all computed in one pass; k is chosen on the selection split.",
)
@click.option(
    "--knn-temperature",
    type=float,
    default=_DEFAULTS.knn_temperature,
    show_default=True,
    help="k-NN: T of the vote weight exp(cosine similarity / T).",
)
@click.option(
    "--knn-weights",
    type=click.Choice(KNN_WEIGHTS),
    default=_DEFAULTS.knn_weights,
    show_default=True,
    help="k-NN: exp(similarity / T) votes (DINO) or one vote per neighbour.",
)
@click.option(
    "--logreg-C",
    "logreg_c",
    default=DEFAULT_LOGREG_C,
    show_default=True,
    metavar="GRID",
    help="Logistic regression: inverse L2 strengths (scikit-learn's C), a list or a log range start:stop:count.",
)
@click.option(
    "--logreg-max-iter",
    type=int,
    default=_DEFAULTS.logreg_max_iter,
    show_default=True,
    help="Logistic regression: L-BFGS iteration cap per C.",
)
@click.option(
    "--logreg-tol",
    type=float,
    default=_DEFAULTS.logreg_tol,
    show_default=True,
    help="Logistic regression: stop when every gradient component is below this (scikit-learn's tol).",
)
@click.option("--queries", type=int, default=_DEFAULTS.attentive_queries, show_default=True,
              help="--method attentive: learned query tokens (their outputs are averaged).")  # fmt: skip
@click.option("--attention-heads", type=int, default=_DEFAULTS.attentive_heads, show_default=True,
              help="--method attentive: attention heads; 0 = the tokens' width / 64 (6 for ViT-S).")  # fmt: skip
@click.option("--attentive-optimizer", type=click.Choice(OPTIMIZERS), default=_DEFAULTS.attentive_optimizer, show_default=True,
              help="--method attentive: its optimizer (V-JEPA: AdamW); --optimizer is the linear heads'.")  # fmt: skip
@click.option(
    "--refit/--no-refit",
    "refit",
    default=True,
    show_default=True,
    help="After selection, fit the chosen lr / k / C again on train + holdout (logreg: + val too) and report that; "
    "--no-refit reports the model fit without the holdout.",
)
@click.option(
    "--augment",
    type=click.Choice(["on", "off"]),
    default="on",
    show_default=True,
    help="Stores with augmented views (featstore extract --augment): the linear heads train on one of each train row's "
    "K views per epoch (seeded); off: on the center crop. Selection, reporting, k-NN and logreg use the center crop.",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where to train; auto = CUDA when present.",
)
@click.option(
    "--out",
    default=None,
    metavar="DIR",
    help="Results folder (results.csv, protocol.json, accuracy_vs_lr.png); refused if not empty. "
    "Default: a new probe-results/run-<UTC time>/.",
)
@click.option("--overwrite", is_flag=True, help="Replace the previous probe run in --out.")
@click.option(
    "--rerun",
    metavar="DIR",
    default=None,
    help="Repeat the run recorded in DIR/protocol.json: its stores (refused if one's content changed), labels, views and "
    "protocol. Takes only --store LABEL=PATH (a recorded store moved), --out, --overwrite, --device, --no-verify, --quiet.",
)
@click.option("--allow-different-data", is_flag=True, help="Compare stores whose dataset manifests differ.")
@click.option(
    "--no-verify", is_flag=True, help="Skip checking what is read against the stores' content digests (schema and label checks stay)."
)
@click.option(
    "--task",
    type=click.Choice(("classify", "depth", "seg")),
    default="classify",
    show_default=True,
    help="depth / seg: dense heads on a patch view (--view patch|patch4) against the store's targets (docs/dense.md).",
)
@click.option("--depth-head", type=click.Choice(("bins", "linear")), default="bins", show_default=True,
              help="--task depth: DINOv2's 256-bin head, or one log-depth output per token.")  # fmt: skip
@click.option(
    "--save-predictions", is_flag=True, help="--task depth/seg: write the reported split's depth or label maps (predictions/*.npz)."
)
@click.option("--max-memory", default=None, metavar="SIZE",
              help="--task depth/seg, --method attentive: tokens held resident (e.g. 2G); beyond it they stream in row blocks. Augmented views: held on the device up to it, else in host memory (up to half the RAM), else read from the store each epoch. Default: a quarter of RAM / GPU memory.")  # fmt: skip
@click.option("--precision", type=click.Choice(("auto", "fp32", "bf16")), default="auto", show_default=True,
              help="--task depth/seg: dtype of the token GEMMs (auto: bf16 on CUDA and on CPUs with bf16 units, else fp32); weights, loss and metrics stay fp32.")  # fmt: skip
@click.option("--quiet", is_flag=True, help="No progress lines on stderr.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def fit_command(
    stores,
    model,
    dataset,
    weights,
    views,
    lr_grid,
    lr,
    wd_grid,
    epochs,
    batch_size,
    optimizer,
    momentum,
    normalize,
    select_on,
    val_fraction,
    test_fraction,
    seed,
    seeds,
    methods,
    shots,
    knn_k,
    knn_temperature,
    knn_weights,
    logreg_c,
    logreg_max_iter,
    logreg_tol,
    queries,
    attention_heads,
    attentive_optimizer,
    refit,
    augment,
    device,
    out,
    overwrite,
    rerun,
    allow_different_data,
    no_verify,
    task,
    depth_head,
    save_predictions,
    max_memory,
    precision,
    quiet,
    debug,
):
    """Train every head of the LR (× weight-decay) grid at once on each store × view, choose the LR
    on a selection split, report it once on another, and write results.csv, summary.csv,
    protocol.json and accuracy_vs_lr.png. --method linear,knn,logreg adds the k-NN and logistic
    regression evaluations (k and C chosen the same way); --shots and --seeds repeat everything
    per few-shot size and seed. Stores: --store, or --model with --dataset for a store in the cache."""
    from .fitting import fit_run
    from .output.files import new_run_folder
    from .output.plots import plot_name
    from .output.tables import markdown_table

    ctx = click.get_current_context()
    command = (ctx.obj or {}).get("argv")
    if rerun is not None:
        from .rerun import load_rerun

        given = [p.opts[0] for p in ctx.command.params if ctx.get_parameter_source(p.name) == ParameterSource.COMMANDLINE]
        taken = ("--rerun", "--store", "--out", "--overwrite", "--device", "--no-verify", "--quiet", "--debug")
        other = [o for o in given if o not in taken]
        if other:
            raise UsageError(f"--rerun takes the stores and protocol from {rerun!r}, not from {', '.join(other)}", "drop those options")
        again = load_rerun(rerun, moved=stores)  # --store LABEL=PATH: a recorded store's new location
        if again.drift:
            click.echo(f"warning: {again.drift}; the numbers may differ", err=True)
        stores, views, allow_different_data = tuple(again.stores), tuple(again.views or ()), again.allow_different_data
        protocol = again.protocol
    else:
        stores, protocol = _stores_and_protocol(**{k: ctx.params[k] for k in inspect.signature(_stores_and_protocol).parameters})
    if task == "classify":  # the dense probes' own options would be silently ignored
        dense_only = [f"--{name.replace('_', '-')}" for name in ("depth_head", "save_predictions", "precision")
                      if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE]  # fmt: skip
        if dense_only:
            raise UsageError(f"{', '.join(dense_only)} applies to --task depth or seg", "drop it, or pass --task depth|seg")
    out = out if out is not None else new_run_folder("probe-results")
    log = (lambda m: None) if quiet else (lambda m: click.echo(m, err=True))
    if task != "classify":  # dense probes: probe.dense
        from .dense.fit import DEFAULT_BATCH, fit_dense, summary_table

        if ctx.get_parameter_source("batch_size") == ParameterSource.DEFAULT:
            protocol = protocol.replace(batch_size=DEFAULT_BATCH)  # images per minibatch, not rows
        dense = fit_dense(list(stores), protocol, task, view=views[0] if views else None, head=depth_head, out=out, overwrite=overwrite,
                          save_predictions=save_predictions, max_memory=_memory(max_memory), device=device,
                          allow_different_data=allow_different_data, log=log, verify=not no_verify, precision=precision)  # fmt: skip
        click.echo(summary_table(dense))
        click.echo(f"wrote {dense.out}/: {', '.join(dense.files)}")
        return
    warn = lambda m: click.echo(f"warning: {_one_line(m)}", err=True)  # noqa: E731
    result = fit_run(
        list(stores),
        protocol,
        views=list(views) or None,
        device=device,
        allow_different_data=allow_different_data,
        out=out,
        overwrite=overwrite,
        log=log,
        warn=warn,
        command=command,
        verify=not no_verify,
        max_memory=_memory(max_memory),
    )
    rows = result.rows
    click.echo(markdown_table(rows, protocol, result.digest))  # summary.csv's digest: nothing computed twice
    plot = f", {plot_name(rows)}" if plot_name(rows) else ""  # the rule write_outputs plots by
    click.echo(f"wrote {out}/: results.csv ({len(rows)} rows), summary.csv, protocol.json, predictions.csv{plot}")


def _memory(text: str | None) -> int | None:
    from .dense.fit import parse_memory

    return parse_memory(text)


def _cached_stores(models: tuple[str, ...], dataset: str | None, weights: tuple[str, ...]) -> tuple[str, ...]:
    """The cached store of each --model (with its --weights) on --dataset, in the order given; no model is built."""
    if not (models or dataset or weights):
        return ()
    if not (models and dataset):
        raise UsageError("--model and --dataset go together", "pass both to find a cached store, e.g. --model dino --dataset imagenet")
    if weights and len(models) == 1:  # one architecture, several checkpoints of it
        pairs: list[tuple[str, str | None]] = [(models[0], w) for w in weights]
    elif weights and len(weights) != len(models):
        raise UsageError(
            f"{len(models)} --model and {len(weights)} --weights: which checkpoint goes with which model is not clear",
            "pass one --weights per --model, in the same order (or one --model with several --weights)",
        )
    else:
        pairs = list(zip(models, weights or (None,) * len(models)))
    from featstore.cache import lookup

    return tuple(lookup(m, dataset, w) for m, w in pairs)


def _stores_and_protocol(
    stores, model, dataset, weights, lr_grid, lr, wd_grid, epochs, batch_size, optimizer, momentum, normalize, select_on,
    val_fraction, test_fraction, seed, seeds, methods, shots, knn_k, knn_temperature, knn_weights, logreg_c, logreg_max_iter,
    logreg_tol, refit, augment, queries=1, attention_heads=0, attentive_optimizer="adamw",
) -> tuple[tuple, Protocol]:  # fmt: skip
    """The stores and the protocol of fit's options."""
    stores = stores + _cached_stores(model, dataset, weights)
    if not stores:
        raise UsageError("no store given", "pass --store PATH, or --model M --dataset D for a store in the cache (see `featstore ls`)")
    if lr is not None and lr_grid is not None:
        raise UsageError("--lr and --lr-grid are exclusive", "pass one fixed --lr or a --lr-grid")
    if lr is not None and not lr > 0:
        raise UsageError(f"--lr must be positive, got {lr:g}", "pass e.g. --lr 0.01")
    if seed is not None and seeds is not None:
        raise UsageError("--seed and --seeds are exclusive", "pass one --seed, or every seed in --seeds")
    grid = cast(tuple[float, ...], (lr,) if lr is not None else (lr_grid or DEFAULT_LR_GRID))  # a grid string: Protocol parses it
    protocol = Protocol(
        lr_grid=grid, wd_grid=wd_grid, optimizer=optimizer, epochs=epochs, batch_size=batch_size, momentum=momentum,
        normalize=normalize, select_on=select_on, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed if seed is not None else _DEFAULTS.seed,
        seeds=seeds or (), methods=tuple(methods) or ("linear",), shots=shots or (), knn_k=knn_k, knn_temperature=knn_temperature, knn_weights=knn_weights,
        logreg_C=logreg_c, logreg_max_iter=logreg_max_iter, logreg_tol=logreg_tol, refit=refit, augment=augment,
        attentive_queries=queries, attentive_heads=attention_heads, attentive_optimizer=attentive_optimizer,
    )  # fmt: skip
    return stores, protocol


@main.command("compare", short_help="Each store vs a reference on the same images: intervals, paired Δ, McNemar, per class.")
@click.argument("results_dir", metavar="RESULTS_DIR")
@click.option(
    "--reference", metavar="LABEL", default=None, help="Store label every other store is compared with. Default: the first store."
)
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON on stdout.")
@click.option("--latex", is_flag=True, help="Print a table for a paper instead (booktabs): Δ vs the reference [95% CI], McNemar p, Holm p.")
@click.option("--markdown", "as_markdown", is_flag=True, help="Print that paper table as markdown instead.")
@click.option(
    "--spread", type=click.Choice(SPREADS), default="ci", show_default=True, help="Paper tables: the 95% interval, or ± std over seeds."
)
@click.option("--resamples", type=click.IntRange(min=1000), default=None, help="Bootstrap resamples (default 2000, at least 1000).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def compare_command(results_dir, reference, as_json, latex, as_markdown, spread, resamples, debug):
    """Each store of a probe fit run against the reference, on the same images: top-1 with 95%
    intervals, the difference with its paired bootstrap interval, McNemar's exact test, per seed
    and per class. Reads RESULTS_DIR/predictions.csv (no features needed)."""
    import json

    from . import intervals
    from .comparison import compare, markdown
    from .dense import compare as dense
    from .results.runs import load, require_predictions

    if sum((as_json, latex, as_markdown)) > 1:
        raise UsageError("--json, --latex and --markdown are exclusive", "pass one of them")
    if dense.is_dense_run(results_dir):  # probe fit --task depth|seg: per-image metrics, paired bootstrap, Wilcoxon
        files = dense.read_run_files(results_dir)  # read once: the comparison and the per-class IoU both use them
        task, differences = dense.compare_dense(files, reference, n_resamples=resamples or dense.N_RESAMPLES)
        if latex or as_markdown:
            from .dense.report import compare_paper_table
            from .output import paper

            table = compare_paper_table(task, differences)
            click.echo(paper.latex(table) if latex else paper.markdown(table), nl=False)
            return
        classes: list = []
        if task == "seg":  # and each class's IoU, Δ to the same reference on the same resampling
            from .dense.report import class_names_of, load_run, per_class_markdown

            run_ = load_run(results_dir)
            ref = reference or run_.labels[0]
            classes = dense.per_class_iou(files, ref, class_names_of(run_), n_resamples=resamples or dense.N_RESAMPLES)
        if as_json:
            click.echo(
                json.dumps(dense.to_json(task, differences) | ({"per_class": [c.to_dict() for c in classes]} if classes else {}), indent=2)
            )
        else:
            click.echo(dense.markdown(task, differences) + (f"\n\n{per_class_markdown(run_.labels, ref, classes)}" if classes else ""))
        return
    run = load(results_dir)
    comparison = compare(require_predictions(run), reference, class_names=run.class_names, n_resamples=resamples or intervals.N_RESAMPLES)
    if latex or as_markdown:
        from .output import paper

        dataset = paper.literal(run.dataset.get("name") or "the dataset")
        split = ", ".join(run.report_splits)
        several = any(len(s.seeds) > 1 for s in comparison.seeds)
        how = "mean ± sample std of the per-seed differences" if spread == "std" and several else "paired bootstrap 95% interval"
        caption = (
            f"Top-1 difference (points) to {paper.literal(comparison.reference)} on the same images of the {split} split of {dataset}, "
            f"{how}; McNemar's exact test (several seeds: the exact sign-flip test of the seed-mean "
            "difference), Holm-adjusted over every comparison of the table; "
            f"in bold: Holm $p$ < {paper.ALPHA:g}."
        )
        table = paper.compare_table(comparison, spread=spread, caption=caption)
        click.echo(paper.latex(table) if latex else paper.markdown(table), nl=False)
        return
    click.echo(json.dumps(comparison.to_json(), indent=2) if as_json else markdown(comparison))


@main.command("report", short_help="One leaderboard and report.html from several results folders.")
@click.argument("folders", nargs=-1, required=True, metavar="DIR [DIR...]")
@click.option(
    "--out",
    default="report",
    show_default=True,
    metavar="DIR",
    help="Folder for leaderboard.md, leaderboard.csv and report.html (those three files are replaced if present).",
)
@click.option("--reference", metavar="LABEL", default=None, help="Store label the others are compared with. Default: the first store.")
@click.option(
    "--allow-mixed",
    is_flag=True,
    help="Report results of different protocols, datasets or report splits as separate groups instead of refusing.",
)
@click.option("--per-seed", is_flag=True, help="One leaderboard row per seed (default: each store's seeds are one row, mean ± std).")
@click.option("--latex", is_flag=True, help="Also write table.tex: each store's top-1 per method, the best per method in bold (booktabs).")
@click.option("--markdown", "as_markdown", is_flag=True, help="Also write table.md: the same table as markdown.")
@click.option(
    "--spread", type=click.Choice(SPREADS), default="ci", show_default=True, help="Paper tables: the 95% interval, or ± std over seeds."
)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def report_command(folders, out, reference, allow_mixed, per_seed, latex, as_markdown, spread, debug):
    """Gather the results folders of probe fit runs into one leaderboard (markdown + CSV) and one
    self-contained report.html: accuracy vs LR, a forest plot of intervals, per-class differences,
    the protocol record. Dense runs (probe fit --task depth|seg): image | truth | each store's
    prediction for the first 4 reported images, the LR curves and the paired comparison."""
    from .dense.compare import is_dense_run
    from .output import leaderboard
    from .output.files import check_report_out
    from .output.report import report

    check_report_out(out)  # before the runs are read (a bad --out failed after them, as "unexpected NotADirectoryError")
    if any(is_dense_run(f) for f in folders):  # probe fit --task depth|seg: images, truth and predictions (probe.dense.report)
        from .dense.report import report as dense_report

        paths = dense_report(list(folders), out, reference=reference, latex=latex, markdown=as_markdown)
        click.echo(paths[leaderboard.LEADERBOARD_MD].read_text(encoding="utf-8"))
        click.echo(f"wrote {', '.join(str(p) for p in paths.values())}")
        return
    paths = report(
        list(folders),
        out,
        reference=reference,
        allow_mixed=allow_mixed,
        per_seed=per_seed,
        latex=latex,
        markdown=as_markdown,
        spread=spread,
    )
    click.echo(paths[leaderboard.LEADERBOARD_MD].read_text(encoding="utf-8"))
    click.echo(f"wrote {', '.join(str(p) for p in paths.values())}")


if __name__ == "__main__":
    main()
