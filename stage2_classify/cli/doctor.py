"""``stage2-classify doctor``: its flags (thresholds from ``DoctorOptions``) and its run."""

from __future__ import annotations

from hybrid_common import add_options, add_progress_flag
from stage2_classify.cli.common import add_features_flag
from stage2_classify.options import DoctorOptions, TrainOptions

DESCRIPTION = ("Checks labelled shards for likely-mislabelled images (confident learning on out-of-fold "
               "probabilities), exact and near-duplicates (and those across splits), and outliers; writes "
               "label_issues.csv, duplicates.csv, outliers.csv, doctor.json and a self-contained report.html into "
               "--out.")
OPTIONS = ("near_threshold", "neighbours", "outlier_z", "folds", "backend")


def add_parser(sub) -> None:
    d = sub.add_parser("doctor", help="find likely label mistakes, duplicates, split leakage and outliers",
                       description=DESCRIPTION)
    add_features_flag(d)
    d.add_argument("--out", required=True, help="folder for the findings and report.html")
    d.add_argument("--images", default=None, help="image root for thumbnails (default: the root stage 1 recorded)")
    d.add_argument("--oof", default=None, help="out-of-fold probabilities (Parquet/CSV: path, prob_<class>…) "
                   "instead of running cross-validation")
    d.add_argument("--run", default=None, help="a training run whose split is checked for leakage")
    add_options(d, TrainOptions, only=("split_file", "seed"),
                help={"split_file": "CSV/Parquet with columns path,split, for the leakage check",
                      "seed": "seeds the cross-validation and the map (default 0)"})
    add_options(d, DoctorOptions, only=OPTIONS)
    d.add_argument("--no-report", action="store_true", help="write the CSV and JSON files only")
    add_progress_flag(d)
    d.set_defaults(handler=run_doctor)


def run_doctor(args) -> None:
    from stage2_classify.doctor.examine import doctor

    result = doctor(args.features, args.out, images=args.images, oof=args.oof, run=args.run,
                    split_file=args.split_file, seed=args.seed, report=not args.no_report, progress=args.progress,
                    **{name: getattr(args, name) for name in OPTIONS})
    print(result.format())
