"""Every data path a run will read, checked at start: the training shards, the held-out shards and each
enabled evaluator's splits. A wrong eval path (or a config's placeholder left in place) would otherwise
surface hours later as an error in every evaluation record; here it is one line naming the key.

The same check serves the trainer (before the engine is built), `python -m pretrain.evaluate` and
`python -m cluster.envcheck`.
"""
from __future__ import annotations

from omegaconf import DictConfig

from data_pipeline.errors import DataSpecError
from data_pipeline.shards.manifest import read_index
from data_pipeline.shards.spec import resolve_parts, spec_parts
from data_pipeline.storage import Storage, exists
from data_pipeline.stream.sources import index_command, label_problem, recorded_label

# What the shipped configs put where the user's data goes (configs/b16.yaml: s3://your-bucket/...).
PLACEHOLDER_MARK = "your-bucket"
TRAIN_KEYS = ("data.train", "data.sources")
# Keys of an evaluator's section that name data it reads.
EVAL_DATA_KEYS = ("train", "test")


def data_paths(cfg: DictConfig, train: bool = True) -> list[tuple[str, str]]:
    """(key, spec) of each data path the run reads: training (``train``), data.val when the upstream
    evaluation runs, and the splits of every enabled evaluator (none with eval.mode none)."""
    paths: list[tuple[str, str]] = []
    if train:
        if cfg.data.sources:
            paths += [(f"data.sources.{i}.train", s.train) for i, s in enumerate(cfg.data.sources)]
        else:
            paths.append(("data.train", cfg.data.train))
    if cfg.eval.mode == "none":
        return paths
    for name in cfg.eval:
        section = cfg.eval[name]
        if not isinstance(section, DictConfig) or not section.get("enabled", False):
            continue
        if name == "upstream":
            paths += [("data.val", cfg.data.val)] if cfg.data.val else []
        else:
            paths += [(f"eval.{name}.{k}", section[k]) for k in EVAL_DATA_KEYS if section.get(k)]
    return paths


def placeholder_error(key: str, spec: str, where: str) -> DataSpecError | None:
    """The one line for a path still at the config's placeholder; None for a real path."""
    if PLACEHOLDER_MARK not in spec:
        return None
    fix = (f"set {key} to your shards' manifest (.json)" if key.startswith(TRAIN_KEYS)
           else f"set it or set {key}=''" if key == "data.val" else f"set it or disable eval.{key.split('.')[1]}")
    return DataSpecError(f"{key} is still the placeholder {spec!r} in {where}; {fix}")


def check_path(key: str, spec: str, storage: Storage, where: str, label: tuple[str, str] | None = None) -> None:
    """The spec's manifests are readable, its first shard exists and, given ``label`` (the config key that
    says where the labels are, its value), the manifests were indexed from there; else one line naming ``key``."""
    error = placeholder_error(key, spec, where)
    if error is not None:
        raise error
    try:
        for given in spec_parts(spec):  # each part's first shard: a manifest's, or the pattern's
            parts = resolve_parts(given, storage)  # a glob or folder that matches nothing stops here
            if key.startswith(TRAIN_KEYS) and not all(p.endswith(".json") for p in parts):
                continue  # training needs manifests: the loader says so, with the command that writes one
            for part in parts if parts[0].endswith(".json") else parts[:1]:
                if part.endswith(".json"):  # header and shard table only, as a training rank reads them
                    manifest = read_index(part, storage)
                    problem = label and label_problem(recorded_label([manifest.header]), label[1], label[0],
                                                      bool(manifest.classes))
                    if problem:
                        raise DataSpecError(f"{part}: {problem}")
                    table = manifest.table
                    urls = [table.url(0)] if len(table) else []
                else:
                    urls = [part]
                if not urls:
                    raise DataSpecError(f"{part!r} names no shards")
                if not exists(storage, urls[0]):  # a store that does not answer is retried, not "not found"
                    raise DataSpecError(f"{urls[0]}: first shard of {given!r} not found")
    except DataSpecError as e:  # StorageError included: it names the URL
        raise DataSpecError(f"{key}: {e}") from None
    except Exception as e:  # noqa: BLE001 -- any storage back-end error is the answer; say which and where
        raise DataSpecError(f"{key}: {spec}: cannot be read ({type(e).__name__}: {e})") from None


def check_data_paths(cfg: DictConfig, storage: Storage, where: str, train: bool = True,
                     generated: str | None = None) -> None:
    """Every path of :func:`data_paths`, in order; the first bad one raises a one-line DataSpecError.
    ``generated``: a root whose data is about to be generated (the demo's data.root): the paths all under
    it are left for the check after generation, every other one (a placeholder, another store) is checked
    now, so a wrong one costs seconds rather than the generation first."""
    for key, spec in data_paths(cfg, train):
        if generated and all(part.startswith(generated.rstrip("/") + "/") for part in spec_parts(spec)):
            continue
        check_path(key, spec, storage, where, label_key(cfg, key))


def label_key(cfg: DictConfig, key: str) -> tuple[str, str] | None:
    """For a training path, the key that says where its labels are and its value: the source's own
    ``label``, else ``data.label``; None for evaluation paths (they read ``.cls``)."""
    if key.startswith("data.sources."):
        i = int(key.split(".")[2])
        own = cfg.data.sources[i].get("label")
        return (f"data.sources.{i}.label", own) if own else ("data.label", cfg.data.label)
    return ("data.label", cfg.data.label) if key == "data.train" else None


def manifest_num_classes(cfg: DictConfig, storage: Storage, where: str) -> int:
    """The class count of the training data: its manifests' ``num_classes`` (or ``len(classes)``), the
    largest over several sources (they share one label space)."""
    specs = ([(f"data.sources.{i}.train", s.train) for i, s in enumerate(cfg.data.sources)]
             or [("data.train", cfg.data.train)])
    counts = []
    for key, spec in specs:
        try:
            parts = [(given, part) for given in spec_parts(spec) for part in resolve_parts(given, storage)]
        except DataSpecError as e:
            raise DataSpecError(f"{key}: {e}") from None
        for given, part in parts:
            if not part.endswith(".json"):  # the loader's own words: training needs manifests anyway
                raise DataSpecError(f"{key}: data spec {given!r} is not a manifest (.json): training needs each "
                                    f"shard's sample count; write one with `{index_command(given)}` and point the "
                                    f"data spec at it; set {key.split('.')[0]}.{key.split('.')[1]} to your "
                                    "shards' manifest (.json)")
            header = read_index(part, storage).header  # no per-shard dicts on every rank at start-up
            n = header.get("num_classes") or len(header.get("classes") or [])
            if not n:
                raise DataSpecError(f"{where}: model.num_classes is 'auto' but the manifest {part!r} ({key}) gives "
                                    "no num_classes or classes; set model.num_classes")
            counts.append(int(n))
    return max(counts)
