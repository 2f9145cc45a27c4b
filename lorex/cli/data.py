"""``lorex data list`` and ``data make``: the built-in datasets, listed or written as folders."""

from __future__ import annotations

import argparse
from pathlib import Path

import lorex.data
from lorex.cli.common_flags import add_seed_flag
from lorex.cli.parsing import Parser, positive_int
from lorex.data import load_dataset, write_imagefolder
from lorex.data.market1501 import write_market1501
from lorex.data.paired import PAIRED_SETS, is_paired_folder, load_paired, write_paired_folder
from lorex.data.reid_synth import DOMAINS, load_reid, split_sizes
from lorex.data.rgbx_synth import PAIRED
from lorex.errors import LorexError
from lorex.io import atomic_directory


def cmd_data_list(args: argparse.Namespace) -> int:
    print(f"{'name':<20} {'train':>7} {'test':>6} {'classes':>7}  description")
    for name, spec in lorex.data.BUILTINS.items():
        if spec.size is not None and spec.classes is not None:  # known without generating
            sizes, classes = (spec.size("train"), spec.size("test")), len(spec.classes)
        else:
            train, test = load_dataset(name, "train"), load_dataset(name, "test")
            sizes, classes = (len(train), len(test)), len(train.classes)
        print(f"{name:<20} {sizes[0]:>7} {sizes[1]:>6} {classes:>7}  {spec.description}")
    print(f"\n{'re-ID':<9} {'ids':>4} {'cams':>4} {'train':>6} {'query':>6} {'gallery':>7}  style")
    for name, d in DOMAINS.items():
        n = split_sizes(name)
        print(
            f"{name:<9} {d.num_ids:>4} {d.cameras:>4} {n['train']:>6} {n['query']:>6} "
            f"{n['gallery']:>7}  {d.description}"
        )
    print(f"\n{'paired':<10} {'modality':<8} {'sensor':<6} {'train':>6} {'test':>5}  classes")
    for name, p in PAIRED.items():
        print(
            f"{name:<10} {p.modality:<8} {p.sensor:<6} {p.size('train'):>6} {p.size('test'):>5}  "
            f"{', '.join(p.classes)}: {p.description}"
        )
    return 0


def cmd_data_make(args: argparse.Namespace) -> int:
    if args.name.startswith("reid/") and not Path(args.name).exists():  # Market-1501 layout
        if args.max_samples is not None:
            raise LorexError("--max-samples does not apply to re-ID domains")
        data = load_reid(args.name)
        with atomic_directory(args.out) as tmp:
            write_market1501(tmp, data)
        sizes = {s: len(getattr(data, s)) for s in ("train", "query", "gallery")}
        print(f"wrote {args.out}: " + ", ".join(f"{s} {n}" for s, n in sizes.items()))
        return 0
    if args.name in PAIRED_SETS or (Path(args.name).is_dir() and is_paired_folder(args.name)):
        pairs = {
            s: load_paired(args.name, s, True, args.max_samples, args.seed)
            for s in ("train", "test")
        }
        with atomic_directory(args.out) as tmp:
            for split, data in pairs.items():
                write_paired_folder(data, tmp / split)
        print(f"wrote {args.out}: " + ", ".join(f"{s} {len(d)}" for s, d in pairs.items()))
        return 0
    splits = {s: load_dataset(args.name, s, args.max_samples, args.seed) for s in ("train", "test")}
    with atomic_directory(args.out) as tmp:
        for split, data in splits.items():
            write_imagefolder(data, tmp / split)
    print(f"wrote {args.out}: " + ", ".join(f"{s} {len(d)}" for s, d in splits.items()))
    return 0


def add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="list or export the built-in datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True, parser_class=Parser)
    p = data_sub.add_parser("list", help="print the built-in datasets and their sizes")
    p.set_defaults(func=cmd_data_list)
    p = data_sub.add_parser(
        "make",
        help="write a dataset in ImageFolder layout (DIR/{train,test}/<class>/); a paired set "
        "(rgbd/k1, rgbnir/a, ...) as DIR/{train,test}/{rgb,depth|nir}/<class>/",
    )
    p.add_argument("name", help="a built-in dataset name, e.g. digits/mnistm or rgbd/k1")
    p.add_argument("--out", required=True, type=Path, help="output directory (written atomically)")
    p.add_argument(
        "--max-samples", type=positive_int, default=None, help="per split, class-balanced"
    )
    add_seed_flag(p)
    p.set_defaults(func=cmd_data_make)
