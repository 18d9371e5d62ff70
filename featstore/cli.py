"""``featstore`` command line: parse, call the library, format the output. No logic here."""

from __future__ import annotations

import json

import click

from .console import OneLineErrors, parse_triple
from .loaders import LOADERS
from .preprocess import INTERPOLATIONS
from .store import DEFAULT_CHUNK_ROWS, FEATURE_DTYPES

debug_option = click.option("--debug", is_flag=True, help="Show tracebacks.")


class _Featstore(OneLineErrors):
    interrupted = "interrupted (rerun the same command to resume)"
    out_of_memory = "lower --batch-size (or --image-size), then rerun the same command to resume"


@click.group(name="featstore", cls=_Featstore, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="featstore")
@debug_option
def cli(debug):
    """Encode labelled image datasets with frozen encoders into Zarr feature stores."""


@cli.command()
@click.option(
    "--model",
    required=True,
    help="Preset (featstore models lists them: dino, dinov2-b, mocov3-vits, mae-b, …), a timm name, tv:<torchvision name>, file.py:build, "
    "or hf:ORG/NAME[@REVISION] from the local Hugging Face hub cache (never downloaded).",
)
@click.option(
    "--dataset",
    default="digits",
    show_default=True,
    help="digits, imagenet, an ImageFolder directory, or a CSV file list (path,label[,split]); dense targets: "
    "nyu-depth-v2, a Pascal VOC folder, or a folder SPLIT/images + SPLIT/depth and/or SPLIT/masks (docs/dense.md); "
    "WebDataset shards: 'wds:DIR/train-{000000..000099}.tar' (braces, globs, fsspec URLs) or wds:SPLITS.yaml (docs/scale.md).",
)
@click.option(
    "--out",
    type=click.Path(),
    help="Store to write (a .zarr folder, or an s3:// / gs:// URL: docs/scale.md); rerunning the same command resumes it. Default: the cache, $FEATSTORE_HOME/stores/<dataset>/<model>-<key>.zarr (see `featstore ls`).",
)
@click.option(
    "--data-root",
    type=click.Path(),
    help="Where 'imagenet' lives (default $FEATSTORE_DATA/imagenet), or 'nyu-depth-v2' (the .mat and splits.mat; with classMapping40.mat also the 40-class masks).",
)
@click.option(
    "--split",
    "split_spec",
    metavar="NAME=FRACTION,...",
    help="Split a dataset without splits, seeded and stratified per class, e.g. train=0.7,val=0.1,test=0.2.",
)
@click.option("--split-seed", type=int, default=0, show_default=True, help="Seed of --split (recorded in the store and its cache key).")
@click.option(
    "--weights",
    type=click.Path(),
    help="Checkpoint (.pth/.pt/.safetensors), loaded with weights_only=True; or a transformers model folder "
    "(config.json + model.safetensors), whose config gives the architecture and preprocessing.",
)
@click.option("--random-init", is_flag=True, help="Run the model untrained (no weights).")
@click.option(
    "--trust-checkpoint",
    is_flag=True,
    help="Unpickle a checkpoint's own classes, running their code (without it they load as inert placeholders).",
)
@click.option(
    "--ignore-keys",
    multiple=True,
    metavar="GLOB",
    help="Drop checkpoint keys matching GLOB (repeatable), e.g. 'linear.*'; reported as ignored.",
)
@click.option("--views", help="Comma-separated feature views (ViT: cls,avgpool,cls4; CNN: pool). Default: all.")
@click.option(
    "--loader",
    type=click.Choice(("auto",) + LOADERS),
    default="auto",
    show_default=True,
    help="Image decoding: dali (GPU or CPU threads), nvjpeg (torchvision on CUDA), torch (PIL reference). "
    "auto: what measured fastest end to end on the device: nvjpeg on CUDA, torch on a CPU.",
)
@click.option("--device", default="auto", show_default=True, help="Where the model runs: auto (cuda when present), cpu, cuda or cuda:N.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Images per forward pass (and per decoded batch).")
@click.option("--workers", type=int, default=2, show_default=True, help="Decode workers (DataLoader processes / DALI threads).")
@click.option(
    "--dtype",
    type=click.Choice(FEATURE_DTYPES),
    default="float16",
    show_default=True,
    help="Stored feature precision (float32 if float16 overflows).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing store at --out.")
@click.option("--repair", is_flag=True, help="Verify the store at --out and re-extract just its damaged units (see `featstore verify`).")
@click.option("--strict", is_flag=True, help="Stop at the first undecodable image instead of recording it as an invalid row.")
@click.option("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS, show_default=True, help="Rows per chunk (and per resumable unit).")
@click.option("--image-size", type=int, help="Crop size (overrides the model's preprocessing).")
@click.option("--resize", type=int, help="Shorter side before the crop; equal to --image-size means no crop margin.")
@click.option("--interpolation", type=click.Choice(INTERPOLATIONS), help="Resize filter (overrides the model's).")
@click.option("--mean", callback=parse_triple, help="R,G,B mean in [0,1] (overrides the model's).")
@click.option("--std", callback=parse_triple, help="R,G,B std in [0,1] (overrides the model's).")
@click.option(
    "--max-decode-pixels",
    type=int,
    help="Pixels decoding and resizing may hold at once: batches are decoded in groups under it, an image over it "
    "alone is an invalid row. Default: a sixth of the memory at 16 bytes a pixel, at least twice PIL's image limit.",
)
@click.option(
    "--labels",
    type=click.Choice(["dense", "sparse"]),
    default="dense",
    show_default=True,
    help="A CSV file list's integer labels: dense 0..C-1, or sparse (the distinct labels, sorted, become classes 0..K-1).",
)
@click.option(
    "--wds-label",
    default="cls",
    show_default=True,
    help="WebDataset shards: the label is the .cls component (cls) or this field of the .json component (KEY, or json:KEY).",
)
@click.option(
    "--augment",
    type=click.Choice(["rrc-flip"]),
    help="Also store K augmented views of every train image: seeded random-resized crops (scale 0.08-1, ratio 3/4-4/3) "
    "+ horizontal flips (p 0.5), DINO's linear-eval augmentation; val/test keep the center crop only (docs/probe.md).",
)
@click.option("--augment-views", type=int, help="K, the augmented views per train image (default 10; needs --augment).")
@click.option("--augment-seed", type=int, help="Seed of the views' crops (default 0; needs --augment; recorded and in the cache key).")
@click.option("--depth-scale", type=float, help="Metres per unit of 16-bit depth PNGs (dense datasets; default 0.001: millimetres).")
@click.option(
    "--nyu-classes",
    type=click.Choice(["40", "13"]),
    default="40",
    show_default=True,
    help="nyu-depth-v2's segmentation masks: Gupta et al.'s 40 classes (classMapping40.mat in --data-root) or the "
    "13 of the multi-task benchmarks (class13Mapping.mat too). Without the mapping files: depth only.",
)
@click.option("--compile", "compile_model", is_flag=True, help="torch.compile the encoder (fixed batch shapes; pays off on long GPU runs).")
@click.option("--no-cuda-graphs", is_flag=True, help="On CUDA, run the forward eagerly instead of replaying it from a CUDA graph.")
@click.option(
    "--no-progress",
    is_flag=True,
    help="No progress output. Otherwise a bar on a terminal, and in logs a line every "
    "$FEATSTORE_PROGRESS_SECONDS (30) with rows, img/s, ETA and invalid rows.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@debug_option
def extract(
    model,
    dataset,
    out,
    data_root,
    split_spec,
    split_seed,
    weights,
    random_init,
    trust_checkpoint,
    ignore_keys,
    views,
    loader,
    device,
    batch_size,
    workers,
    dtype,
    overwrite,
    repair,
    strict,
    chunk_rows,
    image_size,
    resize,
    interpolation,
    mean,
    std,
    max_decode_pixels,
    labels,
    wds_label,
    depth_scale,
    nyu_classes,
    augment,
    augment_views,
    augment_seed,
    compile_model,
    no_cuda_graphs,
    no_progress,
    as_json,
    debug,
):
    """Extract features of every image of DATASET with MODEL into the store OUT (default: the cache)."""
    from .request import ExtractConfig, recall_up_to_date

    config = ExtractConfig(
        model=model,
        dataset=dataset,
        out=out,
        data_root=data_root,
        weights=weights,
        random_init=random_init,
        trust_checkpoint=trust_checkpoint,
        ignore_keys=tuple(ignore_keys),
        views=[v.strip() for v in views.split(",") if v.strip()] if views else None,
        loader=loader,
        device=device,
        batch_size=batch_size,
        workers=workers,
        dtype=dtype,
        overwrite=overwrite,
        strict=strict,
        chunk_rows=chunk_rows,
        image_size=image_size,
        resize=resize,
        interpolation=interpolation,
        mean=mean,
        std=std,
        max_decode_pixels=max_decode_pixels,
        labels=labels,
        compile=compile_model,
        repair=repair,
        split=split_spec,
        split_seed=split_seed,
        cuda_graphs=not no_cuda_graphs,
        depth_scale=depth_scale,
        nyu_classes=int(nyu_classes),
        wds_label=wds_label,
        augment=augment,
        augment_views=augment_views,
        augment_seed=augment_seed,
    )
    result = recall_up_to_date(config)  # an unchanged request answers without importing torch
    if result is None:
        from .extraction import extract as run_extract

        result = run_extract(config, progress=not no_progress, recalled=True)
    if as_json:
        click.echo(json.dumps(result.__dict__, indent=2))
    click.echo(result.summary(), err=as_json)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@debug_option
def models(as_json, debug):
    """List the model presets: name, architecture, views with dims, expected weights file, source."""
    from .models.presets import preset_table

    rows = preset_table()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(format_models(rows))


def format_models(rows: list[dict]) -> str:
    head = ("name", "aliases", "architecture", "views (dims)", "weights file")
    table = [head] + [
        (
            r["name"],
            ", ".join(r["aliases"]) or "-",
            r["architecture"],
            ", ".join(f"{v} {d}" for v, d in r["views"].items()),
            r["weights_file"],
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4] for row in table]
    return (
        "\n".join(lines)
        + "\n\nweights folder: $FEATSTORE_WEIGHTS (default $FEATSTORE_HOME/weights, ~/.cache/featstore/weights); URLs and sources: --json"
    )


@cli.command()
@click.argument("store", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print every field as JSON (all invalid rows, not the first 20).")
@debug_option
def info(store, as_json, debug):
    """Summarize the feature store STORE: splits, views, encoder, provenance, the last run (device,
    img/s), invalid rows and their reasons, and for an incomplete store the command that resumes it."""
    from .store import FeatureStore

    summary = FeatureStore.open(store).info()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(format_info(summary))


@cli.command("verify")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@debug_option
def verify_command(store, as_json, debug):
    """Check every unit of every array of STORE against its content digest, and its schema, chunk
    files, labels and invalid rows. One line per problem (split, array, rows); exit 1 if any."""
    from .store import FeatureStore
    from .store.digests import repair_hint
    from .store.verify import verify_store

    opened = FeatureStore.open(store)
    report = verify_store(opened)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for note in report.notes:
            click.echo(f"note: {note}")
        for problem in report.problems:
            click.echo(f"damaged: {problem.line()}")
        what = f"{report.units:,} units, {_size(report.bytes)} in {report.seconds:.1f} s"
        if report.ok:
            click.echo(f"{report.store}: ok ({what}{', digests' if report.digests else ', no digests'})")
        else:
            click.echo(
                f"{report.store}: {len(report.problems)} problems ({what}); {repair_hint(opened.attrs, opened.format == 'hdf5', str(opened.path))}"
            )
    if not report.ok:
        click.get_current_context().exit(1)


@cli.command("ls")
@click.argument("paths", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (one object per store).")
@debug_option
def ls_command(paths, as_json, debug):
    """List the cached stores ($FEATSTORE_HOME/stores), or the stores at PATHS (stores, folders
    holding stores, .h5 exports or URLs)."""
    from .cache import list_stores, stores_dir

    entries = list_stores(list(paths))
    if as_json:
        click.echo(json.dumps([e.to_dict() for e in entries], indent=2))
        return
    if not entries:
        click.echo(f"no stores in {stores_dir()} (`featstore extract --model M --dataset D` caches one there)")
        return
    click.echo(format_ls(entries))


def format_ls(entries) -> str:
    header = ("LABEL", "MODEL", "WEIGHTS", "DATASET", "VIEWS", "AUGMENT", "ROWS", "INVALID", "SIZE", "CREATED", "STATE", "PATH")
    rows = (
        [header]
        + [
            (
                e.label,
                e.model,
                e.weights,
                e.dataset,
                ",".join(f"{v}:{d}" for v, d in e.views.items()),
                e.augment or "-",  # stores that differ only by their views are told apart
                f"{e.rows:,}",
                str(e.invalid),
                _size(e.size_bytes),
                e.created[:16].replace("T", " "),
                e.state,
                e.path,
            )
            for e in entries
        ]
    )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows)


@cli.command("rm")
@click.argument("stores", nargs=-1, required=True)
@debug_option
def rm_command(stores, debug):
    """Delete stores (refused for one being written). Every name is checked before any is deleted."""
    import os

    from .cache import describe, refuse_link, remove_store
    from .store.locations import is_url

    for s in stores:  # before anything is deleted
        refuse_link(s)
    unique: dict[str, str] = {}  # one store named twice is removed once
    for s in stores:
        unique.setdefault(s if is_url(s) else os.path.abspath(s), s)
    stores = list(unique.values())
    entries = [describe(s) for s in stores]  # a typo stops the command before anything is deleted
    busy = [e.path for e in entries if e.writing]
    if busy:
        from .errors import FeatstoreError

        raise FeatstoreError(f"{busy[0]} is being written right now", "wait for its extraction to finish, or stop it first")
    for e in entries:
        click.echo(f"removed {e.path} ({_size(remove_store(e.path))})")


@cli.command("gc")
@click.option("--older-than", type=float, metavar="DAYS", help="Remove cached stores not used for DAYS days.")
@click.option("--max-size", metavar="SIZE", help="Then remove least recently used stores until the cache fits SIZE (e.g. 50G, 500M).")
@click.option("--partial", is_flag=True, help="Remove unfinished stores nobody is writing.")
@click.option("--dry-run", is_flag=True, help="Only print what would be removed and freed.")
@debug_option
def gc_command(older_than, max_size, partial, dry_run, debug):
    """Free space in the cache, least recently used stores first. Only stores under
    $FEATSTORE_HOME/stores are considered; one being written is never removed."""
    from .cache import parse_size, plan_gc, remove_store

    plan = plan_gc(older_than, parse_size(max_size) if max_size else None, partial)
    verb = "would remove" if dry_run else "removed"
    for e in plan.remove:
        if not dry_run:
            remove_store(e.path)
        click.echo(f"{verb} {e.path} ({_size(e.size_bytes)}, {e.state})")
    click.echo(
        f"{'would free' if dry_run else 'freed'} {_size(plan.freed)}; {len(plan.keep)} stores kept ({_size(sum(e.size_bytes for e in plan.keep))})"
    )


@cli.command("export")
@click.argument("store")
@click.option(
    "--to", "to", required=True, type=click.Path(), help="FILE.h5 (every split and view, the store's schema) or FILE.npz (one view)."
)
@click.option("--view", help="The view of an .npz export (default: the first, cls for a ViT, pool for a CNN).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --to file.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@debug_option
def export_command(store, to, view, overwrite, as_json, debug):
    """Write the complete STORE (a path or URL) as one HDF5 or .npz file."""
    from .store.export import export

    result = export(store, to, view=view, overwrite=overwrite)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    rate = result["feature_bytes"] / 1e6 / result["seconds"] if result["seconds"] > 0 else float("inf")
    what = f"view {result['view']}" if result["view"] else "every view"
    click.echo(f"wrote {result['to']} ({what}, {_size(result['bytes'])}) in {result['seconds']:.1f} s ({rate:.0f} MB/s)")


def format_info(s: dict) -> str:
    enc, pre, data = s["encoder"], s["preprocessing"], s["dataset"]
    state = "complete" if s["complete"] else f"INCOMPLETE, {s['pending_units']} units pending"
    lines = [
        f"store      {s['path']}  ({state}, {_size(s['size_bytes'])})",
        f"encoder    {enc.get('name')} [{enc.get('arch')}]  weights {enc.get('weights_path') or '-'}  sha256 {str(enc.get('weights_sha256'))[:16]}",
        f"preprocess resize {pre.get('resize')} {pre.get('interpolation')}, crop {pre.get('image_size')}, mean {pre.get('mean')}, std {pre.get('std')}  loader {s.get('loader')}",
        f"dataset    {data.get('name')} at {data.get('root')}  "
        + ("dense targets" if s.get("targets") else f"{data.get('num_classes')} classes")  # a dense set's image labels are one dummy class
        + f"  manifest {str(data.get('manifest_sha256'))[:16]}",
        "views      "
        + ", ".join(f"{v} ({'×'.join(map(str, d)) if isinstance(d, list) else d})" for v, d in s["views"].items())
        + f"  dtype {s['dtype']}",
        "splits     "
        + ", ".join(
            f"{name} {v['rows']:,} rows" + (f" ({v['invalid']} invalid)" if v["invalid"] else "") for name, v in s["splits"].items()
        )
        + (
            f"  (--split {','.join(f'{k}={f:g}' for k, f in data['split']['fractions'].items())}, seed {data['split']['seed']})"
            if data.get("split")
            else ""
        ),
        f"created    {s['created']}  featstore {s['featstore_version']}  schema {s['schema_version']}",
    ]
    if s.get("targets"):
        lines.append("targets    " + _targets_line(s["targets"]))
    if s.get("augment"):
        a = s["augment"]
        lines.append(f"augment    {a['method']} × {a['views']} views of {', '.join(a['splits'])} (seed {a['seed']}), {_size(a['bytes'])}")
    if s.get("complete") and s.get("device"):
        rate = s.get("images_per_second")
        lines.append(f"run        on {s['device']}" + (f", {rate:,.1f} img/s" if rate else "") + f", completed {s.get('completed')}")
    if not s["complete"] and s.get("command"):
        lines.append(f"resume     {s['command']}")
    for row in s["invalid"][:20]:
        lines.append(f"invalid    {row['split']}/{row['row']}  {row['path']}: {row['reason']}")
    if len(s["invalid"]) > 20:
        lines.append(f"invalid    … and {len(s['invalid']) - 20} more (see --json)")
    return "\n".join(lines)


def _targets_line(t: dict) -> str:
    parts = [" + ".join(t.get("kinds", [])) + f", {'×'.join(map(str, t.get('size') or []))}, {t.get('layout')} layout"]
    if "depth" in t.get("kinds", []) and t.get("depth_scale") not in (None, 0.001):  # the default: millimetre PNGs
        parts.append(f"depth PNGs in units of {t['depth_scale']:g} m")
    if "mask" in t.get("kinds", []):
        names = t.get("class_names") or []
        shown = f" ({', '.join(names[:6])}{', …' if len(names) > 6 else ''})" if names else ""
        parts.append(f"{t.get('num_classes')} classes{shown}")
    if t.get("invalid_rows"):
        parts.append(f"{t['invalid_rows']} rows without usable targets")
    return "; ".join(parts)


def _size(n: float) -> str:
    """Bytes in B, KB, MB or GB (the largest unit it stays under 1024 in; GB past that)."""
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KB", "MB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GB"


def main() -> None:
    cli.main(prog_name="featstore")


if __name__ == "__main__":
    main()
